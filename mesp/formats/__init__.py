"""File formats, one module each: everything mesp knows about a format's bytes lives in its module.

    mesp.formats.safetensors   headers, lazy row reads, shard discovery, writing
    mesp.formats.gguf          metadata -> config, tensor names, q/k unpermute, block decoders, header checks
    mesp.formats.gguf_writer   writing GGUF (llama.cpp's names, q/k order, metadata), block of rows by block

A format module turns a file into (Hugging Face name, tensor or weight object) pairs and back; which form a
weight takes (dense, quantized, left on disk) is decided by mesp.loaders.
"""
