"""The llama.cpp backend's ``prepare`` (BackendInfo.prepare): the GGUF file a cell loads."""

from __future__ import annotations

from qbench.inputs.sources import SYNTHETIC, resolve, sha256_file
from qbench.quantize.gguf import build_synthetic_variant, build_variant, inspect_gguf
from qbench.quantize.imatrix import build_imatrix, provenance
from qbench.quantize.request import Prepared, PrepareRequest


def prepare(req: PrepareRequest) -> Prepared:
    """The variant's GGUF: a pre-quantized source as is (inspected once, so a broken file fails
    here), else built from the model with llama-quantize (after an imatrix when asked)."""
    variant = req.variant
    if variant.get("source"):
        res = resolve(variant["source"], base_dir=req.base_dir, cache_dir=req.cache_dir)
        inspect_gguf(res.path, req.cache_dir)
        return res.path, {"path": str(res.path), "sha256": sha256_file(res.path, req.cache_dir),
                          "size_bytes": res.path.stat().st_size,
                          "recipe": {"tool": "none (pre-quantized source)",
                                     "source": variant["source"], "revision": res.revision}}
    if direct_synthetic(req):
        art = build_synthetic_variant(
            req.model_file, req.model_sha, req.model["source"], variant["quant"],
            base_dir=req.base_dir, cache_dir=req.cache_dir,
            output_tensor_type=variant.get("output_tensor_type") or "",
            token_embedding_type=variant.get("token_embedding_type") or "")
        return art.path, art.describe()
    imatrix_path, imatrix_sha = None, ""
    if variant.get("imatrix"):
        imatrix_path, imatrix_sha = build_imatrix(req)
    art = build_variant(req.model_file, req.model_sha, variant["quant"], req.model["base"],
                        cache_dir=req.cache_dir, threads=req.threads, imatrix_path=imatrix_path,
                        imatrix_sha=imatrix_sha,
                        output_tensor_type=variant.get("output_tensor_type") or "",
                        token_embedding_type=variant.get("token_embedding_type") or "")
    described = art.describe()
    if imatrix_path is not None:   # where the importance matrix came from, for the report
        prov = {k: v for k, v in provenance(imatrix_path).items() if k != "command"}
        described = described | {"recipe": dict(described.get("recipe") or {}) | {
            "imatrix": prov | {"imatrix_sha256": imatrix_sha}}}
    return art.path, described


def direct_synthetic(req: PrepareRequest) -> bool:
    """A synthetic model's quantized variant is written directly (its values are random: only
    the types and shapes matter), unless it asks for an importance matrix or a type that needs
    one, or is the F16 source itself."""
    from qbench.quantize.synthetic_blocks import direct_supported

    variant = req.variant
    return (str(req.model.get("source", "")).startswith(SYNTHETIC) and not variant.get("imatrix")
            and variant["quant"] != req.model["base"] and direct_supported(variant["quant"])
            and str(req.model_file).endswith(".gguf"))
