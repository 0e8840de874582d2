"""Encoder-decoder packages (T5, BART, mBART, Marian, Whisper) at run time."""

from .model import SEQ2SEQ_PARAMS, Seq2SeqModel, Seq2SeqResult
from .whisper.transcribe import TranscriptionResult

__all__ = ["SEQ2SEQ_PARAMS", "Seq2SeqModel", "Seq2SeqResult", "TranscriptionResult"]
