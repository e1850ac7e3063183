"""The `kiln` command: build, inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from kiln import __version__
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.profile import ProfileResult

_BUILD_EXAMPLE = """example:
  kiln build examples/digits/model.py:DigitsNet --weights examples/digits/digits.safetensors \\
             --input 'image:float32[batch,1,8,8]' --data examples/digits/test.npz --repo models/

SOURCE is file.py:FactoryOrClass or pkg.module:Class (with --weights .pth/.safetensors),
a TorchScript .pt, a torch.export .pt2, or an .onnx file. Named dims (batch, seq) are dynamic;
integer inputs take a value range for synthetic data: 'ids:int64[batch,seq]@0..999'."""

_SERVE_EXAMPLE = """example:
  kiln serve models/ --port 8000 --max-batch-size 32 --max-delay-ms 2
  kiln serve models/ --workers 4           # four processes on one port, answering as one server
  curl -s localhost:8000/v2/models/digits
  curl -s localhost:8000/v2/models/digits/infer -d '{"inputs":[{"name":"image","datatype":"FP32",
       "shape":[1,1,8,8],"data":[0,0,0,...]}]}'

Per-model settings live in models/<name>/config.toml (max_batch_size, max_delay_ms,
preferred_batch_sizes, max_queue_size, timeout_ms, instances, devices, threads, version, variant);
the options below override them for every model."""

_BENCH_EXAMPLE = """examples:
  kiln bench models/digits --batch 1,8,32 --html report.html
  kiln bench models/digits --variants onnxruntime/fp32,aoti/fp32 --threads 1 --json -
  kiln bench models/digits --serving --p99-ms 20      # writes max_batch_size, max_delay_ms to config.toml
  kiln bench examples/digits/model.py:DigitsNet --weights examples/digits/digits.safetensors  # builds first"""

_PROFILE_EXAMPLE = """examples:
  kiln profile models/digits --batch 32
  kiln profile models/digits --variant eager/fp32 --trace trace.json --memory"""

_PREDICT_EXAMPLE = """examples:
  kiln predict models/digits examples/digits/test.npz --out preds.npz --batch 256 --workers 2
  kiln predict models/digits images/ --out preds.parquet          # preprocessing from kiln.toml
  kiln predict models/digits data/*.npz --out preds.npz --resume  # continue a killed run
  kiln predict models/digits data/ --out preds.npz --ray          # on a local Ray, or --ray HOST:PORT"""

_DISTILL_EXAMPLE = """examples:
  kiln distill examples/digits/model.py:DigitsNet --weights examples/digits/digits.safetensors \\
               --data examples/digits/train.npz --eval examples/digits/test.npz --repo models
  kiln distill models/digits --data train.npz --student small.py:Student      # a built teacher, your student
  kiln distill models/digits --data train.npz --prune 0.5                     # recover a structurally pruned model

Without --student, kiln derives one: CNNs keep a share of their channels (--width, initialised from the
teacher's most important ones), transformer encoders every other layer (the DistilBERT recipe)."""

_INSPECT_EXAMPLE = """example:
  kiln inspect models/digits          # latest version, with curl and tritonclient examples
  kiln inspect models/digits/1 --json"""

_INIT_EXAMPLE = """example:
  kiln init examples/minilm/model.py:MiniLM --out /tmp/kiln.toml
  kiln init mymodel.py:make_model      # writes kiln.toml beside mymodel.py"""

_VERSIONS_EXAMPLE = """example:
  kiln versions models/digits
  kiln versions models/digits --keep 3"""


def _console() -> Console:

    # piped output is plain text (kiln.table.show): never wrap it at a guessed width
    return Console(width=None if sys.stdout.isatty() else 1000, soft_wrap=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Turn a trained PyTorch model into a fast, verified artifact.")
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build", help="export every variant, verify it against eager, keep the fastest",
                       description="Export a model through every runtime here, verify each variant against the fp32 "
                       "eager reference, time the accepted ones and keep the fastest.",
                       epilog=_BUILD_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("source", help="file.py:attr, pkg.module:attr, model.pt (TorchScript), model.pt2 or model.onnx")
    b.add_argument("--weights", help="state_dict as .pth/.pt (loaded with weights_only=True) or .safetensors")
    b.add_argument("--input", action="append", dest="inputs", metavar="SPEC",
                   help="NAME:DTYPE[DIMS], repeatable, in forward() order (default: kiln.toml beside the model)")
    b.add_argument("--name", help="model name in the repository (default: kiln.toml's name or the source's)")
    b.add_argument("--repo", default="models", help="model repository folder (default: models)")
    b.add_argument("--data", help=".npz with one array per input name and optional 'labels' (default: synthetic inputs)")
    b.add_argument("--tolerance", type=float, default=1e-3, help="max |variant-ref| / max|ref| per output (default: 1e-3)")
    b.add_argument("--min-cosine", type=float, default=0.999, help="minimum cosine similarity per output (default: 0.999)")
    b.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8", "auto"), default="auto",
                   help="bound the search to one precision; auto tries all (fp16/bf16 on a CPU only where they "
                        "measure faster) (default: auto)")
    b.add_argument("--prune", type=float, metavar="FRACTION",
                   help="also try pruned variants: magnitude (prune<P>) and structured channels (chprune<P>), e.g. 0.3")
    b.add_argument("--variants", metavar="GLOBS",
                   help="comma-separated glob patterns of variants to try, e.g. 'compile/fp16*,eager/fp32*'")
    b.add_argument("--half-min-cosine", type=float, default=0.999, help="fp16/bf16 budget: minimum cosine (default: 0.999)")
    b.add_argument("--calib", help=".npz for int8 calibration (default: a held-out part of --data, else synthetic)")
    b.add_argument("--int8-min-cosine", type=float, default=0.99,
                   help="int8 and pruned budget: minimum cosine (default: 0.99)")
    b.add_argument("--int8-min-top1", type=float, default=0.97, help="int8 budget: minimum top-1 agreement (default: 0.97)")
    b.add_argument("--output", action="append", dest="outputs", default=[], metavar="NAME:KIND",
                   help="what an output is, which decides how it is verified: logits, embedding, regression, mask or "
                        "boxes (repeatable; default: inferred, and the inference is printed)")
    b.add_argument("--prefer", choices=("fastest", "lossless"), default="fastest",
                   help="fastest: a lossy variant (int8, fp16/bf16, pruned) wins when it beats the best fp32 one by more "
                        "than the measured noise; lossless: keep an fp32 variant (default: fastest)")
    b.add_argument("--max-load-s", type=float, metavar="S",
                   help="never select a variant that takes longer than this to load (torch.compile variants take minutes)")
    b.add_argument("--quick", action="store_true",
                   help="try only the variants likeliest to win for their build time (eager, TorchScript, ONNX Runtime; "
                        "half precision where a probe measured it faster) within a 60 s budget")
    b.add_argument("--time-budget", type=float, metavar="S", dest="time_budget",
                   help="skip a variant when its expected build time would pass S seconds since the first variant")
    b.add_argument("--batch", default="1,32", help="batch sizes to time, comma-separated (default: 1,32)")
    b.add_argument("--objective", choices=("latency", "throughput"), default="latency",
                   help="latency: lowest p50 at the smallest batch; throughput: most items/s at the largest")
    b.add_argument("--backends", help="comma-separated subset of eager,torchscript,aoti,onnxruntime,compile,tensorrt and the optional "
                        "openvino,executorch,tvm, or 'all' (default: all but the optional ones)")
    b.add_argument("--tvm-trials", type=int, default=32, metavar="N",
                   help="MetaSchedule tuning trials for the tvm variant; 0 builds untuned with dynamic shapes (default: 32)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    b.add_argument("--dim-size", action="append", default=[], metavar="DIM=N",
                   help="size of a non-batch dynamic dim when timing, e.g. seq=128 (repeatable)")
    b.add_argument("-q", "--quiet", action="store_true", help="print only the table and the result")

    s = sub.add_parser("serve", help="serve a model repository over HTTP (KServe v2 / Open Inference Protocol)",
                       description="Serve every model of a repository with dynamic batching, metrics and health checks.",
                       epilog=_SERVE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("repo", help="model repository made by kiln build")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--grpc-port", type=int, help="also serve the KServe v2 gRPC protocol on this port (pip install 'kiln[grpc]')")
    s.add_argument("--models", help="comma-separated subset of the repository's models")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes sharing the port, each with its own models and a share of the cores: "
                        "more requests/s where one event loop is the bottleneck, N times the memory (default: 1)")
    s.add_argument("--worker-devices", choices=("share", "split", "engine"), default="share",
                   help="with --workers and --device: share, every worker runs the model on every device; split, "
                        "worker i on device i mod the device count (N a multiple of it); engine, one engine process "
                        "per device runs the models (one CUDA context per GPU, batches merged across workers) and the "
                        "workers hand it their batches through shared memory (default: share)")
    s.add_argument("--max-batch-size", type=int, help="rows per execution")
    s.add_argument("--max-delay-ms", type=float, help="batching window, from the first request of a batch")
    s.add_argument("--preferred-batch-sizes", help="comma-separated sizes that run without waiting")
    s.add_argument("--max-queue-size", type=int, help="waiting requests beyond this get 429")
    s.add_argument("--timeout-ms", type=float, help="default request deadline (504 after it)")
    s.add_argument("--instances", type=int, help="model instances per device")
    s.add_argument("--shadow-rate", type=float, metavar="FRACTION",
                   help="drift watch: also run this fraction of requests (e.g. 0.01) through the fp32 reference "
                        "variant, off the hot path; agreement by output kind in /metrics and /v2/models/M/fidelity")
    s.add_argument("--device", action="append", dest="devices", help="cpu, cuda:0 ... (repeat for one instance set per GPU)")
    s.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"),
                   help="require Authorization: Bearer KEY on all but health (default: $KILN_API_KEY)")
    s.add_argument("--max-body-mb", type=float, default=64, help="largest request body (default: 64 MB)")
    s.add_argument("--grace-s", type=float, default=30,
                   help="on SIGTERM/SIGINT: queued requests that can start within this many seconds run, the rest get "
                        "503 with Retry-After; running batches finish; the process exits 0 (default: 30)")
    s.add_argument("--header-timeout-s", type=float, default=10,
                   help="close a connection that has not sent a complete request head within this time (default: 10)")
    s.add_argument("--access-log", action="store_true", help="log one line per request to stderr")
    s.add_argument("--log-json", action="store_true", help="access log as JSON lines (implies --access-log)")
    s.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="deploy on Ray Serve: a local Ray, or the cluster at ADDRESS (pip install 'kiln[ray]')")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: replicas per model")
    s.add_argument("--min-replicas", type=int, help="with --ray and --max-replicas: autoscaling lower bound")
    s.add_argument("--max-replicas", type=int, help="with --ray: autoscale each model up to this many replicas")
    s.add_argument("--target-ongoing-requests", type=float, default=2.0, help="with --ray: autoscaling target per replica")
    s.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs reserved per model replica")
    s.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per model replica")

    be = sub.add_parser("bench", help="latency, throughput, memory and accuracy of every variant",
                        description="Benchmark the accepted variants of a built model (or build a source first).",
                        epilog=_BENCH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    be.add_argument("path", help="repo/<model>[/<version>], or a source as kiln build takes it")
    be.add_argument("--variants", help="comma-separated variants (default: every accepted one)")
    be.add_argument("--batch", default="1,8,32", help="batch sizes (default: 1,8,32)")
    be.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime (default: all cores)")
    be.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    be.add_argument("--data", help=".npz to recompute accuracy against eager/fp32 (default: the build's numbers)")
    be.add_argument("--min-time-s", type=float, default=0.5, help="time spent per batch size per variant (default: 0.5)")
    be.add_argument("--json", metavar="FILE", help="write results as JSON ('-' for stdout)")
    be.add_argument("--csv", metavar="FILE", help="write one row per variant and batch size ('-' for stdout)")
    be.add_argument("--html", metavar="FILE", help="write the self-contained HTML report")
    be.add_argument("--serving", action="store_true", help="derive max_batch_size and max_delay_ms for --p99-ms")
    be.add_argument("--p99-ms", type=float, help="p99 latency target for --serving")
    be.add_argument("--weights", help="with a source: its weights")
    be.add_argument("--input", action="append", dest="inputs", metavar="SPEC", help="with a source: input specs")
    be.add_argument("-q", "--quiet", action="store_true", help="no progress")

    pr = sub.add_parser("profile", help="where the time goes: top operators, a trace, a memory timeline",
                        description="Profile one variant: torch.profiler for torch variants, ONNX Runtime's profiler for ONNX.",
                        epilog=_PROFILE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("path", help="repo/<model>[/<version>]")
    pr.add_argument("--variant", help="variant to profile (default: the selected one)")
    pr.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    pr.add_argument("--steps", type=int, default=20, help="profiled runs after warm-up (default: 20)")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pr.add_argument("--dim-size", action="append", default=[], metavar="DIM=N",
                    help="size of another dynamic dim, e.g. seq=128 (default: the size the model was built at)")
    pr.add_argument("--top", type=int, default=15, help="operators (and, on CUDA, kernels) to list (default: 15)")
    pr.add_argument("--trace", metavar="FILE", help="write a Chrome trace (chrome://tracing, ui.perfetto.dev)")
    pr.add_argument("--memory", action="store_true", help="print a peak-memory timeline")

    pd = sub.add_parser("predict", help="offline batch inference over files, resumable, locally or on Ray",
                        description="Run a built model over .npy/.npz files, image folders or .parquet/.csv tables.",
                        epilog=_PREDICT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    pd.add_argument("model", help="repo/<model>[/<version>]")
    pd.add_argument("inputs", nargs="+", help="files and folders")
    pd.add_argument("--out", required=True, help="output .npz or .parquet: one row per item with its source id")
    pd.add_argument("--batch", type=int, default=64, help="items per model call (default: 64)")
    pd.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    pd.add_argument("--device", default="cpu", help="cpu, cuda:N, cuda (every visible GPU, one runner each) or a list "
                    "such as cuda:0,cuda:1")
    pd.add_argument("--variant", help="variant to run (default: the selected one)")
    pd.add_argument("--shard-size", type=int, default=4096, help="items per output shard (default: 4096)")
    pd.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    pd.add_argument("--on-error", choices=("skip", "stop"), default="skip", help="a bad file: skip it (listed) or stop")
    pd.add_argument("--columns", action="append", default=[], metavar="INPUT=COL,COL,...",
                    help="tables: the columns that feed INPUT, by name, in the model's order (repeatable; default: "
                         "kiln.toml's [columns], else a column named INPUT, else the numeric columns in file order)")
    pd.add_argument("--id-column", metavar="NAME",
                    help="tables: the column whose values become the items' ids in the output (default: a column 'id')")
    pd.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                    help="run on Ray Data: a local Ray, or the cluster at ADDRESS (pip install 'kiln[ray]')")
    pd.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (actors)")
    pd.add_argument("--gpus-per-replica", type=float, default=0.0, help="with --ray: GPUs per replica")
    pd.add_argument("-q", "--quiet", action="store_true", help="no progress")

    ds = sub.add_parser("distill", help="train a smaller student on a teacher's outputs, then build it",
                        description="Knowledge distillation: train a student on the teacher's outputs (KL on logits at a "
                        "temperature, plus labels when given; MSE and cosine on other outputs), stop early on a held-out "
                        "split, then build the student like any model and compare every variant with the teacher.",
                        epilog=_DISTILL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ds.add_argument("teacher", help="anything kiln build takes (file.py:Class, .pt, .pt2), or a built repo/<model>")
    ds.add_argument("--data", required=True, help=".npz with one array per input name and optional 'labels'")
    ds.add_argument("--weights", help="the teacher's weights (for a Python source)")
    ds.add_argument("--input", action="append", dest="inputs", metavar="SPEC", help="the teacher's input specs")
    ds.add_argument("--student", help="file.py:Student to train (default: derived from the teacher)")
    ds.add_argument("--student-weights", help="initial weights for --student")
    ds.add_argument("--width", type=float, default=0.5, help="derived CNN students: share of channels kept (default: 0.5)")
    ds.add_argument("--prune", type=float, metavar="FRACTION",
                    help="the student is the teacher with this share of channels removed (structured), fine-tuned here")
    ds.add_argument("--eval", dest="eval_data", help=".npz neither model trained on: report both accuracies on it")
    ds.add_argument("--repo", default="models", help="model repository for the student (default: models)")
    ds.add_argument("--name", help="the student's name (default: <teacher>-student)")
    ds.add_argument("--epochs", type=int, default=40, help="most epochs (default: 40)")
    ds.add_argument("--max-minutes", type=float, default=10.0, help="time budget for training (default: 10)")
    ds.add_argument("--batch", type=int, default=64, help="training batch size (default: 64)")
    ds.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    ds.add_argument("--temperature", type=float, default=4.0, help="softmax temperature for logits (default: 4)")
    ds.add_argument("--alpha", type=float, default=0.5,
                    help="weight of the teacher against the labels, 0..1 (default: 0.5; 1 ignores labels)")
    ds.add_argument("--holdout", type=float, default=0.25, help="share of --data held out (default: 0.25)")
    ds.add_argument("--patience", type=int, default=6, help="epochs without held-out improvement before stopping")
    ds.add_argument("--seed", type=int, default=0, help="seed for the split, the student and the order (default: 0)")
    ds.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ds.add_argument("--backends", help="backends for the student's build (default: all)")
    ds.add_argument("--precision", default="auto", choices=("fp32", "fp16", "bf16", "int8", "auto"),
                    help="bound the student's build (default: auto)")
    ds.add_argument("-q", "--quiet", action="store_true", help="no progress")

    i = sub.add_parser("inspect", help="show a built model: versions, specs, variants, client examples",
                       description="Show a built model's manifest: source, TensorSpecs, every candidate variant, and "
                       "ready-to-run curl and tritonclient examples for it.",
                       epilog=_INSPECT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", help="repo/<model> (latest version) or repo/<model>/<version>")
    i.add_argument("--json", action="store_true", help="print kiln.json as is")
    i.add_argument("--url", default="localhost:8000", help="server address for the client examples (default: localhost:8000)")

    it = sub.add_parser("init", help="write a kiln.toml from a model's forward() signature",
                        description="Guess each forward() argument's dtype and shape from the model (first layer, "
                        "embedding sizes, argument names), run the guess once, and write kiln.toml beside the model "
                        "with its outputs and a place for output kinds, preprocessing and table columns.",
                        epilog=_INIT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    it.add_argument("source", help="file.py:Factory or pkg.module:Class")
    it.add_argument("--out", help="where to write (default: kiln.toml beside the model file)")
    it.add_argument("--force", action="store_true", help="overwrite an existing file")

    vs = sub.add_parser("versions", help="list a model's versions; --keep N deletes all but the newest N",
                        description="One line per version, newest first: date, selected variant, objective, size.",
                        epilog=_VERSIONS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    vs.add_argument("path", help="repo/<model>")
    vs.add_argument("--keep", type=int, metavar="N", help="delete every version but the newest N")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "distill":
            return _distill(args)
        if args.command == "init":
            return _init(args)
        if args.command == "versions":
            return _versions(args)
        return _inspect(args)
    except KilnError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KilnError(f"bad {what} {text!r}", hint="give comma-separated integers, e.g. 1,32") from None


def _dim_sizes(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        if not k or not v.isdigit():
            raise KilnError(f"bad --dim-size {item!r}", hint="write DIM=N, e.g. seq=128")
        out[k] = int(v)
    return out


def _build(args: argparse.Namespace) -> int:
    from kiln.builder import build
    from kiln.progress import reporter
    from kiln.table import show, variants_table
    from kiln.verify import Budget

    console = _console()
    result = build(
        args.source, weights=args.weights, inputs=args.inputs, name=args.name, repo=args.repo, data=args.data,
        budget=Budget(tolerance=args.tolerance, min_cosine=args.min_cosine, int8_min_cosine=args.int8_min_cosine,
                      int8_min_top1_agreement=args.int8_min_top1, half_min_cosine=args.half_min_cosine),
        precision=args.precision, calib=args.calib, prune=args.prune,
        variants=args.variants.split(",") if args.variants else None, outputs=args.outputs, prefer=args.prefer,
        max_load_s=args.max_load_s, quick=args.quick, time_budget_s=args.time_budget, tvm_trials=args.tvm_trials,
        batch=_int_list(args.batch, "--batch"), objective=args.objective,
        backends=args.backends.split(",") if args.backends else None, device=args.device,
        dim_size=_dim_sizes(args.dim_size), progress=reporter(quiet=args.quiet),
    )
    console.print(f"[bold]{result.name}[/bold]  inputs: {escape(', '.join(map(str, result.inputs)))}  "
                  f"outputs: {escape(', '.join(map(str, result.outputs)))}")
    console.print(f"verified against fp32 reference on {result.verification}")
    show(console, variants_table([c.to_dict() for c in result.candidates], result.batch_sizes, result.selected))
    for note in dict.fromkeys(result.notes + [n for c in result.candidates for n in c.notes]):
        console.print(f"[dim]note: {escape(note)}[/dim]", highlight=False)
    if result.selected is None:
        print("error: no variant passed verification, nothing was written", file=sys.stderr)
        print("  hint: look at the reasons above; loosen --tolerance only if the errors are acceptable", file=sys.stderr)
        return 1
    margin = result.selection.get("margin")
    why = "" if margin is None else f", {margin:.0%} ahead of the next" if margin >= 0 else \
        f", lossless: a lossy variant measured {-margin:.0%} faster, within the noise"
    console.print(f"selected [bold]{result.selected}[/bold] ({result.objective}{why}) -> {result.path}", highlight=False)
    console.print(f"report: {result.path / 'report.html'}", highlight=False)  # type: ignore[operator]
    return 0


def _check_repository_folder(repo: Path) -> None:
    """`kiln serve models/digits` (a model, or one of its versions) instead of the repository: say which to give."""
    from kiln import repository

    if (repo / repository.MANIFEST).is_file():
        raise KilnError(f"{repo} is one version of a model, not a model repository",
                        hint=f"serve the repository two levels up: kiln serve {repo.parent.parent} --models {repo.parent.name}")
    if repository.versions(repo):
        raise KilnError(f"{repo} is a model folder (versions {', '.join(map(str, repository.versions(repo)))}), "
                        "not a model repository", hint=f"serve its parent: kiln serve {repo.parent} --models {repo.name}")


def check_serve_device(device: str) -> None:
    """--device is checked before anything loads: a name kiln knows, and a GPU that is there."""
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise KilnError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N (e.g. --device cuda:0)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise KilnError(f"--device {device} but this machine has no CUDA GPU", hint="serve with --device cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise KilnError(f"--device {device} but this machine has {torch.cuda.device_count()} GPU(s)",
                            hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def _serve(args: argparse.Namespace) -> int:
    from kiln.server.dataplane import DataPlane
    from kiln.server.run import Settings, serve

    overrides = {
        "max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms, "max_queue_size": args.max_queue_size,
        "timeout_ms": args.timeout_ms, "instances": args.instances, "devices": args.devices,
        "shadow_rate": args.shadow_rate,
        "preferred_batch_sizes": _int_list(args.preferred_batch_sizes, "--preferred-batch-sizes") if args.preferred_batch_sizes else None,
    }
    if args.ray is not None and args.workers != 1:
        raise KilnError("--workers is for one machine; on Ray, scale with --replicas (or --max-replicas)",
                        hint="drop --workers, or drop --ray")
    if args.ray is not None:
        from kiln.ray import require_ray

        require_ray()
        from kiln.ray.serve import run as run_on_ray

        run_on_ray(args.repo, host=args.host, port=args.port, address=args.ray if isinstance(args.ray, str) else None,
                   models=args.models.split(",") if args.models else None, overrides=overrides,
                   num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                   target_ongoing_requests=args.target_ongoing_requests, cpus_per_replica=args.cpus_per_replica,
                   gpus_per_replica=args.gpus_per_replica, api_key=args.api_key,
                   max_body_bytes=int(args.max_body_mb * (1 << 20)))
        return 0
    for device in args.devices or []:
        check_serve_device(device)
    _check_repository_folder(Path(args.repo))
    plane = DataPlane(Path(args.repo), overrides=overrides, only=args.models.split(",") if args.models else None,
                      drain_s=args.grace_s)
    names = plane.available()
    unknown = sorted(set(args.models.split(",")) - set(names)) if args.models else []
    if unknown:
        everything = DataPlane(Path(args.repo)).available()
        raise KilnError(f"no model {', '.join(unknown)} in {args.repo}", hint=f"the repository has {', '.join(everything) or 'no built models'}")
    if not names:
        raise KilnError(f"no built models in {args.repo}", hint="build one with kiln build ... --repo " + args.repo)
    if args.grpc_port is not None:
        from kiln.server.grpc_service import _modules

        _modules()  # refuse now, with the install hint, rather than after the models load
    if args.workers < 1:
        raise KilnError(f"--workers {args.workers}: give at least 1", hint="e.g. --workers 2 on a machine with 2+ cores")
    if args.worker_devices == "split" and (len(args.devices or []) < 2 or args.workers % len(args.devices)):
        raise KilnError(f"--worker-devices split needs several --device and --workers a multiple of their count "
                        f"(got {len(args.devices or [])} device(s), {args.workers} worker(s))",
                        hint="e.g. --workers 8 --device cuda:0 --device cuda:1 --worker-devices split")
    if args.worker_devices == "engine" and not args.devices:
        raise KilnError("--worker-devices engine needs the devices to start engines on",
                        hint="e.g. --workers 8 --device cuda:0 --device cuda:1 --worker-devices engine")
    settings = Settings(repo=args.repo, host=args.host, port=args.port, models=args.models.split(",") if args.models else None,
                        overrides=overrides, grpc_port=args.grpc_port, api_key=args.api_key,
                        max_body_bytes=int(args.max_body_mb * (1 << 20)), access_log=args.access_log,
                        log_json=args.log_json, grace_s=args.grace_s, header_timeout_s=args.header_timeout_s,
                        worker_devices=args.worker_devices)
    grpc_text = f" and grpc://{args.host}:{args.grpc_port}" if args.grpc_port is not None else ""

    def banner(port: int, workers: str = "") -> None:
        print(f"kiln serve: {', '.join(names)} on http://{args.host}:{port}{grpc_text}{workers} (ready at "
              "/v2/health/ready once warm)", file=sys.stderr, flush=True)

    if args.workers > 1 or args.worker_devices == "engine":
        from kiln.server.workers import supervise

        return supervise(settings, args.workers, on_listening=lambda port: banner(port, f", {args.workers} workers"))
    banner(args.port)
    return serve(settings)


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    from kiln.bench.advice import advise, write_config
    from kiln.bench.run import bench, median_curve, report_data, rows, to_csv
    from kiln.progress import reporter
    from kiln.report import write_html
    from kiln.table import Grid, show

    if args.serving and args.p99_ms is None:
        raise KilnError("--serving needs a latency target", hint="add --p99-ms, e.g. --p99-ms 20")
    path = args.path
    if not Path(path).exists() or Path(path).suffix in (".pt", ".pt2", ".onnx", ".pth"):
        from kiln.builder import build

        tmp = tempfile.mkdtemp(prefix="kiln-bench-")
        result = build(path, weights=args.weights, inputs=args.inputs, repo=tmp, data=args.data, device=args.device,
                       progress=reporter(quiet=args.quiet))
        if result.path is None:
            raise KilnError("no variant passed verification", hint="run kiln build to see why")
        path = str(result.path)
    r = bench(path, variants=args.variants.split(",") if args.variants else None, batch_sizes=_int_list(args.batch, "--batch"),
              threads=args.threads, device=args.device, data=args.data, min_time_s=args.min_time_s,
              progress=reporter(quiet=args.quiet))
    console = _console()
    metrics = rows(r)
    table = Grid(None, ["variant", *(label for label, _ in metrics)])  # one row per variant: a build can have a dozen
    for i, v in enumerate(r.variants):
        if v.selected:
            table.marked = i
        table.add([v.variant + (" *" if v.selected else ""), *(cells[i] for _, cells in metrics)])
    failed = [v for v in r.variants if v.status != "accepted"]
    if args.json != "-" and args.csv != "-":
        console.print(f"{r.model} v{r.version} on {r.device}, {r.threads} thread(s); accuracy {r.accuracy_source}",
                      highlight=False)
        show(console, table)
        for v in failed:
            console.print(f"[red]{escape(v.variant)} failed: {escape(v.reason)}[/red]")
    if args.json:
        text = json.dumps(r.to_dict(), indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    if args.csv:
        text = to_csv(r)
        print(text, end="") if args.csv == "-" else Path(args.csv).write_text(text)
    if args.html:
        write_html(report_data(r), Path(args.html))
        print(f"report: {args.html}", file=sys.stderr)
    if args.serving:
        target = next((v for v in r.variants if v.selected and v.status == "accepted"), None) or \
            next((v for v in r.variants if v.status == "accepted"), None)
        if target is None:
            raise KilnError("no variant could be timed", hint="see the reasons above")
        advice = advise(median_curve(target), args.p99_ms)
        f = write_config(r.path.parent, advice)
        print(f"serving advice for {target.variant}: max_batch_size = {advice.max_batch_size}, "
              f"max_delay_ms = {advice.max_delay_ms} ({advice.reason}) -> {f}", file=sys.stderr)
    return 1 if failed else 0


def _profile(args: argparse.Namespace) -> int:
    from kiln.profile import profile

    result = profile(args.path, variant=args.variant, batch=args.batch, steps=args.steps, device=args.device,
                     trace=args.trace, memory=args.memory, dim_size=_dim_sizes(args.dim_size))
    from kiln.table import Grid, show

    console = _console()
    if result.run_us is not None:
        _kernel_tables(console, result, result.run_us, args)
    console.print(f"{result.variant} at batch {args.batch} ({result.shapes}): top operators by "
                  f"{'CPU ' if result.run_us else ''}self time over {args.steps} runs ({result.profiler})", highlight=False)
    t = Grid(None, ["operator", "self ms", "self %", "calls"])
    total = sum(o.self_ms for o in result.ops) or 1.0
    for o in result.ops[: args.top]:
        t.add([o.name, f"{o.self_ms:.3f}", f"{100 * o.self_ms / total:.1f}", str(o.calls)])
    show(console, t)
    if result.trace:
        console.print(f"trace: {result.trace} (open in chrome://tracing or ui.perfetto.dev)", highlight=False)
    if result.memory:
        console.print(result.memory, highlight=False)
    return 0


def _kernel_tables(console: Console, result: ProfileResult, run_us: float, args: argparse.Namespace) -> None:
    """On CUDA: one run's wall time, the GPU time by kernel kind, and the kernels one by one."""
    from kiln.table import Grid, show

    gpu_us = sum(k.us for k in result.kernels)
    console.print(f"{result.variant} at batch {args.batch} ({result.shapes}) on {args.device}: {run_us:,.0f} us per run "
                  f"(median, synchronized), {gpu_us:,.0f} us of it in GPU kernels ({gpu_us / run_us:.0%} busy)",
                  highlight=False)
    t = Grid(None, ["kernel kind", "us per run", "share"])
    for kind, us in result.kinds():
        t.add([kind, f"{us:,.1f}", f"{us / (gpu_us or 1):.1%}"])
    show(console, t)
    t = Grid(None, ["kernel", "kind", "us per run", "share", "launches per run"])
    for k in result.kernels[: args.top]:
        name = k.name if len(k.name) <= 90 else k.name[:87] + "..."
        t.add([name, k.kind, f"{k.us:,.1f}", f"{k.us / (gpu_us or 1):.1%}", f"{k.launches:g}"])
    show(console, t)


def _predict(args: argparse.Namespace) -> int:
    from kiln.predict import devices_of, predict

    for device in devices_of(args.device):
        check_serve_device(device)

    columns = {}
    for item in args.columns:
        name, _, cols = item.partition("=")
        if not name or not cols:
            raise KilnError(f"bad --columns {item!r}", hint="write INPUT=col1,col2,... e.g. --columns x=age,income")
        columns[name] = [c.strip() for c in cols.split(",") if c.strip()]
    s = predict(args.model, args.inputs, args.out, batch=args.batch, workers=args.workers, device=args.device,
                variant=args.variant, shard_size=args.shard_size, resume=args.resume, on_error=args.on_error,
                ray=args.ray, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                progress=not args.quiet, columns=columns or None, id_column=args.id_column)
    for note in s.notes:
        print(f"note: {note}", file=sys.stderr)
    resumed = f" ({s.resumed_items} from the earlier run)" if s.resumed_items else ""
    skipped = f"; {len(s.skipped)} item{'s' * (len(s.skipped) != 1)} skipped" if s.skipped else ""
    ignored = f"; {len(s.ignored)} file{'s' * (len(s.ignored) != 1)} ignored" if s.ignored else ""
    print(f"wrote {s.written} of {s.items} items{resumed} to {s.out} in {s.elapsed_s:.1f}s "
          f"({s.items_per_s:,.0f} items/s, {s.engine}){skipped}{ignored}")
    for what, rows in (("skipped", s.skipped), ("ignored", s.ignored)):
        for src, err in rows[:20]:
            print(f"  {what} {src}: {err}")
        if len(rows) > 20:
            print(f"  ... and {len(rows) - 20} more {what}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from kiln.distiller import distill
    from kiln.progress import reporter
    from kiln.table import show, variants_table

    opts: dict[str, Any] = {"precision": args.precision}
    if args.backends:
        opts["backends"] = args.backends.split(",")
    r = distill(args.teacher, data=args.data, student=args.student, student_weights=args.student_weights,
                weights=args.weights, inputs=args.inputs, repo=args.repo, name=args.name, width=args.width,
                prune=args.prune, epochs=args.epochs, max_minutes=args.max_minutes, batch=args.batch, lr=args.lr,
                temperature=args.temperature, alpha=args.alpha, holdout=args.holdout, patience=args.patience,
                seed=args.seed, resume=args.resume, eval_data=args.eval_data, progress=reporter(quiet=args.quiet),
                build_options=opts)
    console = _console()
    s = r.summary
    console.print(f"student: {escape(r.derived or r.student)}", highlight=False)
    console.print(f"trained {s['epochs']} epoch(s) on {s['train_items']} items, {escape(r.stopped)}; best held-out loss "
                  f"{s['best_heldout_loss']:.4f}; parameters {s['teacher_parameters']:,} -> {s['student_parameters']:,}",
                  highlight=False)
    show(console, variants_table([c.to_dict() for c in r.build.candidates], r.build.batch_sizes, r.build.selected))
    ev = s.get("eval")
    if ev and "student_accuracy" in ev:
        console.print(f"on {ev['data']} ({ev['items']} items): teacher {ev['teacher_accuracy']:.2%}, student "
                      f"{ev['student_accuracy']:.2%} ({ev['accuracy_delta']:+.2%}), agreement {ev['agreement']:.2%}",
                      highlight=False)
    if r.build.selected is None:
        print("error: no student variant passed verification, nothing was written", file=sys.stderr)
        return 1
    speed = ", ".join(f"{v:.1f}x at batch {b}" for b, v in s.get("speedup_vs_teacher_eager", {}).items())
    console.print(f"selected [bold]{r.build.selected}[/bold] -> {r.build.path} ({speed} against the teacher in eager "
                  "fp32)", highlight=False)
    console.print(f"report: {r.build.path / 'report.html'}", highlight=False)  # type: ignore[operator]
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kiln import repository
    from kiln.table import show, variants_table

    vdir, m = repository.resolve(args.path)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    console = _console()
    others = repository.versions(vdir.parent)
    console.print(f"[bold]{m['name']}[/bold] version {m['version']} (versions: {', '.join(map(str, others))})  built {m['created']}")
    src = m["source"]
    console.print(f"source: {src['text']}  sha256 {src['sha256'][:12]}" + (f"  weights sha256 {src['weights_sha256'][:12]}" if src.get("weights_sha256") else ""), highlight=False)
    console.print(escape("inputs:  " + ", ".join(_spec(s) for s in m["inputs"])), highlight=False)
    console.print(escape("outputs: " + ", ".join(_spec(s) for s in m["outputs"])), highlight=False)
    console.print(escape(f"verified on {m['verification']['data']}; budget {m['verification']['budget']}"), highlight=False)
    show(console, variants_table(m["candidates"], m["batch_sizes"], m["selected"]))
    lib = m["libraries"]
    console.print(f"selected [bold]{m['selected']}[/bold] ({m['objective']}); built with " + ", ".join(f"{k} {v}" for k, v in lib.items())
                  + f"; device {m['device'].get('device')} ({m['device'].get('cpu')})", highlight=False)
    sel = repository.candidate(m)
    console.print(f"artifact: {os.path.join(str(vdir), sel['artifact']['dir'])} ({sel['artifact']['bytes']:,} bytes)", highlight=False)
    from kiln.scaffold import client_examples

    curl, py = client_examples(m, url=args.url)
    repo_dir = vdir.parent.parent
    console.print(f"\ntry it: kiln serve {repo_dir}, then\n{curl}\n\nor with tritonclient (pip install "
                  f"'tritonclient[http]'):\n{py}", highlight=False, markup=False, soft_wrap=True)
    return 0


def _init(args: argparse.Namespace) -> int:
    from kiln.scaffold import init_toml

    path, ran = init_toml(args.source, out=Path(args.out) if args.out else None, force=args.force)
    print(path.read_text(), end="")
    if not ran:
        print(f"error: wrote {path}, but its guessed inputs do not run through the model (see the comment in it)",
              file=sys.stderr)
        print("  hint: fix the shapes, then kiln build", file=sys.stderr)
        return 1
    print(f"wrote {path}: check the guesses, then kiln build {args.source}", file=sys.stderr)
    return 0


def _versions(args: argparse.Namespace) -> int:
    from kiln import repository
    from kiln.table import Grid, show

    model_dir = Path(args.path)
    if not model_dir.is_dir() or not repository.versions(model_dir):
        raise KilnError(f"no model versions in {model_dir}", hint="give repo/<model>, e.g. models/digits")
    if args.keep is not None:
        for v in repository.prune_versions(model_dir, args.keep):
            print(f"removed {model_dir / str(v)}", file=sys.stderr)
    g = Grid(None, ["version", "created", "selected", "objective", "size MB"])
    for r in repository.version_rows(model_dir):
        g.add([str(r["version"]), r["created"], r["selected"] or r.get("error", "-"), r["objective"] or "-",
               f"{r['bytes'] / 1e6:.2f}"])
    show(_console(), g)
    return 0


def _spec(d: dict[str, Any]) -> str:
    return f"{d['name']}:{d['dtype']}[{','.join(map(str, d['shape']))}]"


if __name__ == "__main__":
    sys.exit(main())
