"""Evaluation texts: named datasets resolved from a local data dir, else Hugging Face datasets.

The data dir comes from --data-dir, $QBENCH_DATA_DIR or the suite's defaults.data_dir; tests and
CI point it at shared/data, so nothing is downloaded and nothing is copied into the repo.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import DatasetError

# name -> (file under the data dir, Hugging Face (path, config, split), how to join rows)
NAMED_TEXTS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "wikitext-2": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
}


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    origin: str        # the file it was read from, or hf:path/config/split
    sha256: str

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def data_dir_from(cli: str | None = None, suite_default: str = "") -> Path | None:
    """--data-dir beats $QBENCH_DATA_DIR beats the suite's defaults.data_dir."""
    for candidate in (cli, os.environ.get("QBENCH_DATA_DIR"), suite_default):
        if candidate:
            return Path(candidate).expanduser().resolve()
    return None


def locate_text(name: str, data_dir: Path | None, base_dir: Path) -> str:
    """Where ``name`` will be read from, checked without reading it; DatasetError if nowhere."""
    if name in NAMED_TEXTS:
        rel, (hf_path, hf_config, split) = NAMED_TEXTS[name]
        if data_dir is not None:
            path = data_dir / rel
            if path.is_file():
                return str(path)
            raise DatasetError(f"dataset '{name}' not found: expected {path} (data dir "
                               f"{data_dir} from --data-dir / QBENCH_DATA_DIR)")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DatasetError(
                f"dataset '{name}': no data dir given (--data-dir or QBENCH_DATA_DIR pointing at "
                f"a folder with {rel}) and the 'datasets' package is not installed for the "
                f"Hugging Face fallback (pip install 'qbench-llm[datasets]')") from None
        return f"hf:{hf_path}/{hf_config}/{split}"
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise DatasetError(f"dataset '{name}' is neither a known name ({', '.join(NAMED_TEXTS)}) "
                           f"nor an existing text file ({path})")
    return str(path.resolve())


def load_text(name: str, data_dir: Path | None, base_dir: Path) -> Text:
    """Read the whole evaluation text, exactly as llama-perplexity reads its -f file."""
    origin = locate_text(name, data_dir, base_dir)
    if origin.startswith("hf:"):
        import datasets
        hf_path, hf_config, split = NAMED_TEXTS[name][1]
        try:
            rows = datasets.load_dataset(hf_path, hf_config, split=split)
        except Exception as exc:  # the datasets library raises many kinds when offline
            raise DatasetError(f"dataset '{name}': Hugging Face download of {hf_path}/"
                               f"{hf_config} failed ({type(exc).__name__}: {exc}); give a "
                               "local data dir instead") from None
        text = "".join(rows["text"])
    else:
        try:
            text = Path(origin).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read dataset '{name}' from {origin}: {exc}") from None
    if not text.strip():
        raise DatasetError(f"dataset '{name}' ({origin}) is empty")
    return Text(name, text, origin, hashlib.sha256(text.encode("utf-8")).hexdigest())
