"""Speech packages (Whisper): audio reading and log-mel features, long-form transcription."""
