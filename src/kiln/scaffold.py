"""`kiln init` writes a kiln.toml from a model's forward() signature; `kiln inspect` prints ready-to-run client
examples (curl and tritonclient) for a built model.

The input guesses come from the model itself: the first layer (Conv2d -> an image, Linear -> a feature vector,
Embedding -> token ids with the vocabulary as their range and the position table as the longest sequence) and
argument names (`*mask*`, `token_type_ids`). The guess is run once; the file says whether it ran and what came out.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from kiln.errors import KilnError
from kiln.spec import TensorSpec, example_sizes

_IMAGE: dict[type[nn.Module], list[int | str]] = {nn.Conv1d: ["batch", "{c}", "length"],
                                                  nn.Conv2d: ["batch", "{c}", 224, 224],
                                                  nn.Conv3d: ["batch", "{c}", 16, 112, 112]}


def forward_parameters(module: nn.Module) -> tuple[list[str], list[str]]:
    """(arguments kiln should feed, other arguments left at their defaults). Required arguments first; a model
    whose arguments all have defaults (transformers) gets its first one plus the mask and token type ids."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return [], []
    required = [p.name for p in params if p.default is p.empty]
    if required:
        return required, [p.name for p in params if p.name not in required]
    fed = [p.name for i, p in enumerate(params) if i == 0 or p.name in ("attention_mask", "token_type_ids")]
    return fed, [p.name for p in params if p.name not in fed]


def guess_input(name: str, module: nn.Module) -> tuple[dict[str, Any], str]:
    """One [[inputs]] table for argument `name`, and a comment saying where the guess came from."""
    layers = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    embeddings = [(n, m) for n, m in layers if isinstance(m, nn.Embedding)]
    positions = next((m for n, m in embeddings if "pos" in n.lower()), None)
    seq = f"seq<={positions.num_embeddings}" if positions is not None else "seq"
    low = name.lower()
    if "mask" in low:
        return {"dtype": "int64", "shape": ["batch", seq], "range": [0, 1]}, "named like a mask: 1 = a real token"
    if "token_type" in low:
        types = next((m for n, m in embeddings if "type" in n.lower()), None)
        top = types.num_embeddings - 1 if types is not None else 1
        return {"dtype": "int64", "shape": ["batch", seq], "range": [0, top]}, "token type ids (segments)"
    first = layers[0][1] if layers else None
    words = next((m for n, m in embeddings if "pos" not in n.lower() and "type" not in n.lower()), None)
    if words is not None and (isinstance(first, nn.Embedding) or "id" in low or "token" in low):
        return ({"dtype": "int64", "shape": ["batch", seq], "range": [0, words.num_embeddings - 1]},
                f"token ids: the vocabulary has {words.num_embeddings} entries" +
                (f", the position table {positions.num_embeddings}" if positions is not None else ""))
    for kind, shape in _IMAGE.items():
        if isinstance(first, kind):
            c = first.in_channels
            dims = [c if d == "{c}" else d for d in shape]
            return {"dtype": "float32", "shape": dims}, f"the first layer is {kind.__name__}({c}, ...): set the size you train at"
    if isinstance(first, nn.Linear):
        return {"dtype": "float32", "shape": ["batch", first.in_features]}, f"the first layer is Linear({first.in_features}, ...)"
    return {"dtype": "float32", "shape": ["batch", 1]}, "no guess from the first layer: fill in the shape"


def init_toml(source: str, *, out: Path | None = None, force: bool = False) -> tuple[Path, bool]:
    """Write kiln.toml for `file.py:Factory` (beside the file, where `kiln build` reads it). Returns the path and
    whether the guessed inputs ran through the model."""
    from kiln.signature import discover_outputs
    from kiln.source import ModelSource, load_module
    from kiln.verify import infer_kind

    src = ModelSource.parse(source)
    if src.kind != "python":
        raise KilnError(f"kiln init reads a Python model (file.py:Factory), not a {src.kind} file",
                        hint="ONNX and .pt2 files carry their own signature: kiln build reads it")
    path = out or ((src.path.parent if src.path else Path.cwd()) / "kiln.toml")
    if path.exists() and not force:
        raise KilnError(f"{path} exists", hint="pass --force to overwrite it, or --out another path")
    module = load_module(src)
    fed, rest = forward_parameters(module)
    if not fed:
        raise KilnError(f"cannot read forward()'s arguments of {source}", hint="write kiln.toml by hand (see the README)")
    guesses = [(n, *guess_input(n, module)) for n in fed]
    specs = [TensorSpec.from_dict({"name": n, **g}) for n, g, _ in guesses]
    try:
        outputs, _ = discover_outputs(module, specs)
        ran, error = True, ""
    except KilnError as e:
        outputs, ran, error = [], False, e.message
    sizes = example_sizes(specs)
    lines = [f"# Written by `kiln init {source}` from forward()'s signature. Check every guess: `kiln build` reads",
             "# this file when no --input is given. Dims: an int is fixed, a name is dynamic (\"batch\", \"seq\"),",
             "# \"seq<=512\" caps one; `range` bounds integer inputs (token ids must stay inside the vocabulary).",
             f'name = "{(src.attr or "model").lower()}"', ""]
    for n, g, why in guesses:
        lines += ["[[inputs]]", f'name = "{n}"', f'dtype = "{g["dtype"]}"  # {why}', f"shape = {json.dumps(g['shape'])}"]
        if "range" in g:
            lines.append(f"range = {json.dumps(g['range'])}")
        lines.append("")
    if rest:
        lines += [f"# forward() also takes {', '.join(rest)}: left at their defaults. Add an [[inputs]] table to feed one.", ""]
    if ran:
        shown = ", ".join(f"{s.name}={list(s.concrete_shape(sizes))}" for s in specs)
        lines += [f"# The guess ran: inputs {shown} gave these outputs. Say what each is (it decides how",
                  "# variants are verified): logits | embedding | regression | mask | boxes."]
        for o in outputs:
            kind, why = infer_kind(o)
            lines += ["[[outputs]]", f'name = "{o.name}"  # {o.dtype}[{",".join(map(str, o.shape))}]',
                      f'kind = "{kind}"  # guessed: {why}', ""]
    else:
        lines += [f"# The guess did not run: {error}", "# Fix the shapes above, then run kiln init --force again, or kiln build.",
                  "# [[outputs]]", '# name = "output"', '# kind = "logits"  # logits | embedding | regression | mask | boxes', ""]
    if any(len(s.shape) == 4 for s in specs):
        lines += ["# How `kiln predict` reads image files (without it: RGB, pixel / 255, CHW, no normalisation):",
                  "# [preprocess]", '# mode = "RGB"', "# resize = [224, 224]", "# mean = [0.485, 0.456, 0.406]",
                  "# std = [0.229, 0.224, 0.225]", ""]
    table = next((s for s in specs if len(s.shape) == 2 and s.torch_dtype.is_floating_point), None)
    if table is not None:
        lines += ["# Which parquet/csv columns feed the input, in training order (kiln predict matches them by name):",
                  "# [columns]", f'# {table.name} = ["age", "income", "..."]', ""]
    path.write_text("\n".join(lines))
    return path, ran


def client_examples(manifest: dict[str, Any], *, url: str = "localhost:8000") -> tuple[str, str]:
    """(a curl command, a tritonclient script) that send one zero-filled item to the served model."""
    from kiln.server.codec import DATATYPES

    name = manifest["name"]
    specs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
    sizes = {d: 1 if d == "batch" else 8 for s in specs for d in s.dynamic_dims.values()}
    shapes = [list(s.concrete_shape(sizes)) for s in specs]
    tensors = []
    for s, shape in zip(specs, shapes):
        n = math.prod(shape)
        dt = DATATYPES[s.dtype] if s.dtype != "bfloat16" else "BF16"
        zero = 0 if s.dtype.startswith(("int", "uint")) else (False if s.dtype == "bool" else 0.0)
        tensors.append((s, shape, dt, n, zero))
    endpoint = f"http://{url}/v2/models/{name}/infer"
    if sum(n for *_, n, _ in tensors) <= 64:
        body = json.dumps({"inputs": [{"name": s.name, "shape": shape, "datatype": dt, "data": [z] * n}
                                      for s, shape, dt, n, z in tensors]})
        curl = f"curl -s {endpoint} -H 'Content-Type: application/json' -d '{body}'"
    else:  # a large input: let Python write the body instead of pasting thousands of zeros
        parts = ", ".join(f'{{"name": "{s.name}", "shape": {shape}, "datatype": "{dt}", "data": [{z!r}] * {n}}}'
                          for s, shape, dt, n, z in tensors)
        curl = (f"python3 -c 'import json; print(json.dumps({{\"inputs\": [{parts}]}}))' \\\n"
                f"  | curl -s {endpoint} -H 'Content-Type: application/json' -d @-")
    np_types = {"bfloat16": "float32"}
    py = ["import numpy as np", "import tritonclient.http as httpclient", "",
          f'client = httpclient.InferenceServerClient("{url}")', "inputs = []"]
    for s, shape, dt, _n, _z in tensors:
        py += [f'x = httpclient.InferInput("{s.name}", {shape}, "{dt if dt != "BF16" else "FP32"}")',
               f"x.set_data_from_numpy(np.zeros({shape}, np.{np_types.get(s.dtype, s.dtype)}))", "inputs.append(x)"]
    py += [f'result = client.infer("{name}", inputs)']
    py += [f'print("{o["name"]}", result.as_numpy("{o["name"]}").shape)' for o in manifest["outputs"]]
    return curl, "\n".join(py)
