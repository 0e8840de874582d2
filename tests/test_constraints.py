"""Constrained decoding (edgeinfer/constraints.py): every kind of constraint holds on a random tiny
model, with sampling, penalties and stop strings; lossless strategies under a constraint give
exactly constrained plain greedy's tokens; bad constraints are one-sentence errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import edgeinfer
from edgeinfer.constraints import ConstraintError, compile_constraint, lark_derives_nothing
from edgeinfer.errors import GenerationError

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "word": {"type": "string", "maxLength": 6},
}, "required": ["n", "ok", "color", "word"], "additionalProperties": False}
PROMPTS = ["Paris is the capital of", "The quick brown fox jumps over the lazy dog. The quick brown fox",
           "def add(a, b):\n    return a + b\n"]


def valid_instance(obj) -> bool:
    """SCHEMA checked by hand (jsonschema is not a dependency)."""
    return (isinstance(obj, dict) and set(obj) == {"n", "ok", "color", "word"}
            and isinstance(obj["n"], int) and not isinstance(obj["n"], bool) and 0 <= obj["n"] <= 99
            and isinstance(obj["ok"], bool) and obj["color"] in ("red", "green", "blue")
            and isinstance(obj["word"], str) and len(obj["word"]) <= 6)


@pytest.fixture(scope="module")
def model(tiny_packages):
    return edgeinfer.load(tiny_packages("llama", "fp32"))


@pytest.fixture(scope="module")
def exit_package(tiny_models, tmp_path_factory):
    from edgeinfer.export import export_model

    out = tmp_path_factory.mktemp("constraint-exits") / "llama-exits"
    export_model(str(tiny_models("llama")), out, "fp32", exits=[1, 2], max_context=256, progress=False)
    return out


def test_json_schema_output_is_valid_and_unconstrained_is_not(model):
    for prompt in PROMPTS:
        res = model.complete(prompt, max_new_tokens=80, json_schema=SCHEMA)
        assert res.finish_reason == "stop" and res.stats["constraint"]["complete"], res.text
        assert valid_instance(json.loads(res.text)), res.text
        free = model.complete(prompt, max_new_tokens=40)
        with pytest.raises(ValueError):  # the random model writes no JSON on its own: the mask did it
            json.loads(free.text)


@pytest.mark.parametrize("seed", range(4))
def test_constraint_composes_with_sampling_penalty_and_top_p(model, seed):
    res = model.complete(PROMPTS[seed % 3], max_new_tokens=80, json_schema=json.dumps(SCHEMA), temperature=1.3,
                         top_p=0.9, top_k=50, repetition_penalty=1.3, seed=seed)
    assert res.stats["constraint"]["complete"] and valid_instance(json.loads(res.text)), res.text
    res = model.complete(PROMPTS[0], max_new_tokens=30, regex=r"[a-z]{2,8}( [a-z]{2,8}){2}", temperature=1.0,
                         seed=seed)
    assert re.fullmatch(r"[a-z]{2,8}( [a-z]{2,8}){2}", res.text), res.text


def test_regex_choices_grammar_and_json_object(model):
    res = model.complete(PROMPTS[0], max_new_tokens=30, regex=r"\d{3}-\d{4}")
    assert re.fullmatch(r"\d{3}-\d{4}", res.text) and res.finish_reason == "stop"
    choices = ["yes", "no", "it depends"]
    for prompt in PROMPTS:
        assert model.complete(prompt, max_new_tokens=10, choices=choices).text in choices
    lark = 'start: "The answer is " NUM "."\nNUM: /[1-9][0-9]?/'
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", model.complete(PROMPTS[1], max_new_tokens=20,
                                                                        grammar=lark).text)
    gbnf = 'root ::= "(" num ("," num)? ")"\nnum ::= [0-9]'
    assert re.fullmatch(r"\([0-9](,[0-9])?\)", model.complete(PROMPTS[2], max_new_tokens=20, grammar=gbnf).text)
    res = model.complete(PROMPTS[0], max_new_tokens=120, json_object=True)
    if res.finish_reason == "stop":
        assert isinstance(json.loads(res.text), dict)
    else:  # a random model may write one long string; it must still be a JSON object's prefix
        assert res.text.startswith("{") and not res.stats["constraint"]["complete"]


def test_chat_with_a_schema(model):
    gen = model.chat([{"role": "user", "content": "Give me JSON."}], max_new_tokens=80, json_schema=SCHEMA)
    assert valid_instance(json.loads(gen.text()))


def test_cut_by_max_tokens_is_length_and_claims_nothing(model):
    res = model.complete(PROMPTS[0], max_new_tokens=3, json_schema=SCHEMA)
    assert res.finish_reason == "length" and res.new_tokens == 3
    assert res.stats["constraint"]["complete"] is False


def test_stop_string_still_cuts_a_constrained_output(model):
    full = model.complete(PROMPTS[0], max_new_tokens=80, json_schema=SCHEMA)
    cut = model.complete(PROMPTS[0], max_new_tokens=80, json_schema=SCHEMA, stop=['"ok"'])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index('"ok"')]
    assert cut.stats["constraint"]["complete"] is False


@pytest.mark.parametrize("strategy,opts", [("lookup", {}), ("lookup", {"draft_len": 3}),
                                           ("self-speculative", {"exit_layer": 1}),
                                           ("self-speculative", {"exit_layer": 2, "draft_len": 5}),
                                           ("adaptive", {}), ("speculative", {"exit_layer": 1})])
def test_lossless_strategies_under_a_constraint_equal_constrained_greedy(exit_package, strategy, opts):
    model = edgeinfer.load(exit_package)
    kinds = [{"json_schema": SCHEMA}, {"regex": r"(ab|cd|[a-z ]){5,30}\."},
             {"grammar": 'start: item ("," item)*\nitem: "fox" | "dog" | /[a-z]{1,3}/'}]
    for prompt in PROMPTS:
        for kind in kinds:
            model.reset()
            plain = model.complete(prompt, max_new_tokens=40, **kind)
            model.reset()
            fast = model.complete(prompt, max_new_tokens=40, strategy=strategy, **kind, **opts)
            assert fast.tokens == plain.tokens, (strategy, opts, prompt, kind)
            assert fast.stats["strategy"] == strategy


def test_lookup_drafts_are_verified_against_the_constraint(exit_package):
    """A prompt that repeats itself gives lookup long drafts; the constraint must reject those it forbids."""
    model = edgeinfer.load(exit_package)
    prompt = "the dog the dog the dog the dog the dog the dog the dog"
    plain = model.complete(prompt, max_new_tokens=30, regex=r"(the |dog |cat ){3,12}")
    fast = model.complete(prompt, max_new_tokens=30, regex=r"(the |dog |cat ){3,12}", strategy="lookup")
    assert fast.tokens == plain.tokens and re.fullmatch(r"(the |dog |cat ){3,12}", fast.text)
    assert fast.stats["drafted"] > 0


def test_token_mask_rolls_back_to_the_same_masks(model):
    """After a speculative detour (consume, roll back) the mask equals a fresh matcher's."""
    c = compile_constraint(model.tokenizer, model.decoder.vocab_size, json_schema=SCHEMA)
    ids = model.tokenizer.encode('{"n":12,"ok":true,"color":"red","word":"ab"}', add_special_tokens=False)
    walk = c.start(2)
    masks = [walk.allowed([7, 7] + ids[:i]).copy() for i in range(len(ids) + 1)]
    assert masks[-1][sorted(c.eos_token_ids)].all()  # the whole object: EOS may come
    assert not masks[0][sorted(c.eos_token_ids)].any()
    for i in (9, 3, 0, 5):
        assert np.array_equal(walk.allowed([7, 7] + ids[:i]), masks[i]), i
    assert np.array_equal(c.start(0).allowed(ids[:6]), masks[6])
    with pytest.raises(GenerationError, match="not allowed"):
        c.start(0).allowed(model.tokenizer.encode("nope", add_special_tokens=False))


@pytest.mark.parametrize("kwargs,match", [
    ({"json_schema": {"type": "text"}}, "JSON schema is not valid: schema.type"),
    ({"json_schema": {"properties": {"a": {"maxLength": -1}}}}, "not valid: schema.properties.a.maxLength"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": {"type": "string", "pattern": "(?<=a)b"}}, "JSON schema cannot be compiled.*look-around"),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "JSON schema cannot be compiled"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "JSON schema cannot be compiled"),
    ({"regex": "(ab"}, "regex cannot be compiled.*unclosed group"),
    ({"regex": r"[^\s\S]"}, "regex admits no string"),
    ({"grammar": "start: undefined_rule"}, "grammar cannot be compiled"),
    ({"grammar": 'start: "a" start'}, "grammar admits no string"),
    ({"grammar": 'root ::= "x" root'}, "grammar admits no string"),
    ({"grammar": "root ::= (("}, "GBNF grammar does not parse"),
    ({"choices": []}, "choices must be a non-empty list"),
    ({"choices": ["a", ""]}, "choices must be a non-empty list"),
    ({"regex": "a", "choices": ["a"]}, "give one constraint"),
    ({"json_object": "yes"}, "json_object must be True"),
])
def test_bad_constraints_are_one_sentence_errors(model, kwargs, match):
    with pytest.raises(ConstraintError, match=match) as err:
        model.complete(PROMPTS[0], max_new_tokens=5, **kwargs)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_ignore_eos_is_refused_with_a_constraint(model):
    with pytest.raises(GenerationError, match="ignore_eos cannot be combined"):
        model.complete(PROMPTS[0], max_new_tokens=5, regex="a+", ignore_eos=True)


@pytest.mark.parametrize("lark,empty", [
    ('start: "a" start', True), ('start: x\nx: "b" x | "c" y\ny: y "d"', True), ('start: ("a" start)+', True),
    ('start: x~2\nx: x', True), ('start: "a" | start "b"', False), ('start: [start] "x"', False),
    ('start: ("a" start)?', False), ('start: item*\nitem: "x" item', False), ('start: x~0..3\nx: x', False),
    ('start: %json {"type": "object"}', False), ('start: "n" NUM\nNUM: /[0-9]+/', False),
])
def test_lark_productivity_check(lark, empty):
    assert lark_derives_nothing(lark) is empty


def test_encoder_decoder_greedy_and_sampling_obey_a_constraint(tmp_path):
    from edgeinfer.export import export_model
    from test_seq2seq_text import _build

    _build("t5", tmp_path / "t5")
    export_model(str(tmp_path / "t5"), tmp_path / "t5-pkg", "fp32", progress=False)
    model = edgeinfer.load(tmp_path / "t5-pkg")
    text = "The quick brown fox jumps over the lazy dog."
    free = model.generate(text, max_new_tokens=20)
    for params in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        res = model.generate(text, max_new_tokens=60, json_schema=SCHEMA, **params)
        assert res.finish_reason == "stop" and valid_instance(json.loads(res.text)), res.text
    assert model.generate(text, max_new_tokens=10, choices=["fox", "dog"]).text in ("fox", "dog")
    assert not free.text.startswith("{")
    with pytest.raises(GenerationError, match="greedy or sampled decoding"):
        model.generate(text, max_new_tokens=10, choices=["a"], num_beams=2)


def test_import_edgeinfer_does_not_load_the_constraint_library():
    import subprocess
    import sys

    code = "import sys, edgeinfer; print('llguidance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_constraint_flags(tiny_packages, tmp_path, capsys):
    from edgeinfer.cli import main

    pkg = str(tiny_packages("llama", "fp32"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["run", pkg, PROMPTS[0], "--json-schema", str(schema), "--max-new-tokens", "80", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert valid_instance(json.loads(out["text"])) and out["stats"]["constraint"]["complete"]
    assert main(["run", pkg, PROMPTS[1], "--choice", "red", "--choice", "blue", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("red", "blue")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "x" [0-9]')
    assert main(["run", pkg, PROMPTS[2], "--grammar", str(grammar), "--json"]) == 0
    assert re.fullmatch(r"x[0-9]", json.loads(capsys.readouterr().out)["text"])
    for argv, match in [(["--regex", "(ab"], "regex cannot be compiled"),
                        (["--grammar", str(tmp_path / "missing.lark")], "cannot read the file"),
                        (["--regex", "a", "--json-object"], "give one constraint")]:
        assert main(["run", pkg, "x", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgeinfer: error:") and match in err and "\n" not in err


def test_desktop_app_json_output_toggle(tiny_packages):
    """The chat window's "JSON output" toggle and schema field, offscreen: the reply follows the schema."""
    import os
    import sys
    import time
    from pathlib import Path

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from apps.desktop.chat_app import ChatWindow

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])

    def wait_until(predicate, timeout=60.0):
        deadline = time.time() + timeout
        while not predicate() and time.time() < deadline:
            app.processEvents()
            time.sleep(0.002)
        return predicate()

    win = ChatWindow(str(tiny_packages("llama", "fp32")), max_new_tokens=100)
    win.show()
    assert wait_until(lambda: win.input.isEnabled())
    assert not win.schema.isEnabled()
    win.json_toggle.setChecked(True)
    assert win.schema.isEnabled()
    win.schema.setText(json.dumps(SCHEMA))
    win.input.setText("Paris is the capital of")
    win.send()
    assert wait_until(lambda: win.busy) and wait_until(lambda: not win.busy)
    assert valid_instance(json.loads(win.last_result["text"])) and win.last_result["finish_reason"] == "stop"
    assert win.last_result["text"] in win.transcript.toPlainText()
    win.schema.setText("{not json")  # refused before anything runs, said in the status bar
    win.input.setText("again")
    win.send()
    assert not win.busy and "not valid JSON" in win.statusBar().currentMessage()
    win.schema.setText('{"type": "nope"}')  # the runtime's one sentence
    win.input.setText("again")
    win.send()
    assert wait_until(lambda: "JSON schema is not valid" in win.statusBar().currentMessage())
    win.json_toggle.setChecked(False)
    win.input.setText("free text")
    win.send()
    assert wait_until(lambda: win.busy or win.last_result["finish_reason"] != "stop", 5)
    assert wait_until(lambda: not win.busy)
    win.close()


def test_a_pydantic_class_is_a_schema(model):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=9)
        label: str = pydantic.Field(max_length=4)

    res = model.complete(PROMPTS[0], max_new_tokens=60, json_schema=Point)
    assert res.stats["constraint"]["complete"]
    Point.model_validate_json(res.text)
