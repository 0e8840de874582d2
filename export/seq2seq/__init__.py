"""Encoder-decoder packages (Whisper, T5, BART, Marian): graphs and export."""
