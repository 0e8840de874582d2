"""What every export pipeline shares: how a package is written (:class:`PackageBuild`) and what an
export returns (:class:`ExportResult`).

The five pipelines (hand-built dense decoders, the optimum fallback, sparse MoE, the npu target and
encoder-decoder models) differ in the graphs they build and the manifest they fill in; everything
around that is here once: an existing output is refused unless forced, everything is written into a
staging folder beside it (``graphs/``, the tokenizer, the graphs with their IO names listed), the
manifest goes last with every file's hash, and the folder is renamed into place (package_writer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import ExportError
from edgeinfer.package import Manifest

from . import package_writer


@dataclass
class ExportResult:
    path: Path
    manifest: dict  # as written
    size_bytes: int

    @property
    def spec(self) -> Manifest:
        """The typed view of the written manifest (edgeinfer.package.manifest)."""
        return Manifest.from_dict(self.manifest)


def refuse_existing(out: str | Path, force: bool) -> Path:
    """OUT as a path; an existing OUT without FORCE is refused before any work is done."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"'{out}' already exists: choose another -o or pass --force to replace it.")
    return out


class PackageBuild:
    """One package being written, as a context manager::

        with PackageBuild(out, force) as build:
            build.save_graph(builder, {"name": "stage0", "role": "stage", ...})
            build.write_tokenizer(src.tokenizer_json)
            build.write_manifest(Manifest(..., graphs=build.graph_entries()))
        return build.result()

    ``folder`` is the staging folder (with ``graphs/``); on an error it is removed and OUT is untouched.
    """

    def __init__(self, out: str | Path, force: bool):
        self.out = refuse_existing(out, force)
        self.force = force
        self.graphs: list[dict] = []
        self.manifest: dict | None = None
        self._staging = None
        self.folder: Path | None = None

    def __enter__(self) -> PackageBuild:
        self._staging = package_writer.staging_folder(self.out, self.force)
        self.folder = self._staging.__enter__()
        (self.folder / "graphs").mkdir()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._staging.__exit__(*exc)

    def save_graph(self, builder, entry: dict) -> dict:
        """Save BUILDER (a GraphBuilder) at ENTRY's path (default ``graphs/NAME.onnx``) and list it;
        the entry gets the graph's input and output names unless it names them itself."""
        name = entry.get("name", builder.name)
        entry = {"name": name, "path": f"graphs/{name}.onnx", **entry}
        builder.save(self.folder / entry["path"])
        entry.setdefault("inputs", [v.name for v in builder.inputs])
        entry.setdefault("outputs", [v.name for v in builder.outputs])
        self.graphs.append(entry)
        return entry

    def write_tokenizer(self, tokenizer_json: str) -> None:
        (self.folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")

    def write_manifest(self, spec: Manifest) -> dict:
        """Hash every file written so far into SPEC and write it; may be called again after more files."""
        self.manifest = package_writer.write_manifest(self.folder, spec)
        return self.manifest

    def result(self) -> ExportResult:
        if self.manifest is None:
            raise RuntimeError("PackageBuild.result() before write_manifest()")
        return ExportResult(self.out, self.manifest, sum(m["size"] for m in self.manifest["files"].values()))
