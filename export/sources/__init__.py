"""Reading a model: GGUF files (header, metadata, tensors), Hugging Face folders, CTranslate2
folders, aliases; ``load.load_source`` turns any of them into a SourceModel."""
