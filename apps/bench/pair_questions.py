"""Questions with one right answer for the Qwen2.5-Coder pair: quality.py's eight general ones and eight
about code (the pair are code models). A reply is right if an accepted answer is a word of it."""

from __future__ import annotations

from quality import QUESTIONS as GENERAL
from quality import answer_is_right

CODE = [
    ("In Python, what does len([4, 5, 6]) return?", ["3", "three"]),
    ("In Python, what is the value of 7 // 2?", ["3", "three"]),
    ("Which Python keyword defines a function?", ["def"]),
    ("What is 2 to the power of 10?", ["1024"]),
    ("Which HTTP status code means 'Not Found'?", ["404"]),
    ("What does SQL stand for?", ["Structured Query Language"]),
    ("In JavaScript, what does typeof null return?", ["object", "'object'", '"object"']),
    ("How many bits are in a byte?", ["8", "eight"]),
]
QUESTIONS = GENERAL + CODE

__all__ = ["QUESTIONS", "answer_is_right"]
