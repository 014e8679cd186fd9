"""The export-family contract, its defaults, and how a family's export module is found.

A model family named NAME in models/__init__.py (`family_for_model_type(config["model_type"])`) is
exported by the module `export.NAME`, imported by name (`export_family`). That module defines every
function below; the last two have defaults here, which a family without its own takes with
`from .family_defaults import extra_assets, video_preprocessing_params`.

Loading and describing the model:
- `load_model(folder, dtype=torch.float32, empty=False)`: the transformers model of a local checkpoint
  folder, eager attention, eval mode. `empty=True`: parameters on the meta device, each tagged with
  its checkpoint name (`export.streamed.empty_model`), for the streamed export.
- `manifest_sections(model) -> dict`: the family's parts of manifest.json: at least "text_config"
  (the pipeline adds its "kv_dtype"), "vision_config" and "special_tokens".

Graphs (each export writes its file and returns the names of its external-data files, if any):
- `export_vision(model, path) -> list[str]`: the vision graph.
- `decoder_graph(model, kv_dtype) -> nn.Module`: the decoder wrapper to trace (the runtime's KV-cache
  contract; `num_layers`, `kv_dtype`, `input_names`, `output_names`); the streamed export traces it
  on an empty model.
- `export_decoder(model, path, kv_dtype="float32") -> list[str]`: the decoder graph.
- `decoder_example(model, graph) -> (args, dynamic_shapes)`: inputs to trace `graph` with.
- `embedding_table(model) -> np.ndarray`: the token-embedding table, float32 [vocab, hidden].

Parity:
- `reference_case(model, new_tokens=8, kv_dtype="float32") -> dict`: eager-PyTorch outputs the graphs
  are checked against (export/parity.py), computed before export so the eager model can be freed:
  "vision_feeds" (the vision graph's inputs by name), "vision_outputs" (the vision graph's expected
  outputs by name, image features first), "input_ids", "pixel_values", "image_grid_thw" (what the
  runtime family's `prepare` takes), "first_logits", "tokens" (greedy) and "kv_dtype".

Preprocessing and assets:
- `preprocessing_params(raw, manifest) -> dict`: preprocessor_config.json (`raw`, {} when absent)
  normalised for the runtime (manifest "preprocessing"); a ValueError names a mismatch with the model.
- `extra_assets(folder, staging, manifest) -> dict`: files of the family's own written into `staging`
  (e.g. a prompt template the checkpoint lacks), and the manifest entries they make. Default: none.
- `video_preprocessing_params(raw, manifest) -> dict | None`: the video preprocessing (manifest
  "video_preprocessing") from the checkpoint's video processor config (`raw`, {} when absent); None:
  the family reads no video and the manifest gets no "video_preprocessing". Default: None.
"""
from __future__ import annotations

import importlib

from vlm_core.export.errors import ExportError

CONTRACT = ("load_model", "manifest_sections", "export_vision", "decoder_graph", "export_decoder",
            "decoder_example", "embedding_table", "reference_case", "preprocessing_params", "extra_assets",
            "video_preprocessing_params")


def extra_assets(folder: str, staging: str, manifest: dict) -> dict:
    """No files of the family's own: the checkpoint's tokenizer, template and configs are all it needs."""
    return {}


def video_preprocessing_params(raw: dict, manifest: dict) -> dict | None:
    """None: the family reads no video (the manifest gets no "video_preprocessing")."""
    return None


def export_family(name: str):
    """The export module of family `name` (`export.<name>`), checked to define the whole contract."""
    module_name = f"{__package__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the module exists but something it imports does not
        raise ExportError(f"the {name!r} family has no export module ({module_name.replace('.', '/')}.py); "
                          f"it cannot be exported yet") from None
    missing = [function for function in CONTRACT if not callable(getattr(module, function, None))]
    if missing:
        raise ExportError(f"{module_name} does not define {', '.join(missing)} (the export-family contract in "
                          f"export/family_defaults.py)")
    return module
