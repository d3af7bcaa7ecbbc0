"""The speed stage of benchmarks/gpu_evidence.py: training-step throughput, MFU and the data paths on one GPU.

Parts, in priority order; each is skipped when the stage's deadline would not leave it its usual time, and
`--parts` picks some of them for a second call:
  matmul                 the bf16 matrix-product rate of this GPU, measured: 8192^3, median of 20 after warm-up
  mae                    MAE ViT-B/16 @224 (batch 256, decoder 8x512) and ViT-Tiny/4 @32 (batch 1024, 4x192)
                         beside transformers' ViTMAE, eager (harness.py's interleaved rounds)
  mae-compiled           the ViT-B/16 pair, torch.compile (mae-tiny-compiled: the ViT-Tiny pair, later)
  data                   the data paths alone on CIFAR-10 (dataloader.py): Pillow workers, the device cache with
                         host-drawn and device-drawn crops, GPU JPEG decoding
  methods-tiny, methods-base                    every method as `mimkit pretrain` builds it (sections.py), eager,
                                                interleaved rounds; BEiT beside transformers' BEiT
  mae-tiny-compiled                             the ViT-Tiny MAE pair compiled
  methods-tiny-compiled, methods-base-compiled  every method compiled, one at a time
MFU = training FLOPs per image x images/s, over (a) the matmul rate measured in this run and (b) the datasheet's
dense bf16 peak. FLOPs are counted by torch.utils.flop_counter over one eager step of the model just timed
(matrix products, convolutions, attention; element-wise work and the optimizer are not counted); MAE's are also
given by throughput.py's formula, the figure docs/benchmarks.md uses.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from evidence import attempt
from harness import autocast, measure_many, sync

PARTS = ("matmul", "mae", "mae-compiled", "data", "methods-tiny", "methods-base", "mae-tiny-compiled",
         "methods-tiny-compiled", "methods-base-compiled")  # fmt: skip


@dataclass
class Plan:
    """What the speed stage runs: the real sizes on a GPU, toy ones on a dry run."""

    device: torch.device
    dtype: torch.dtype | None
    steps: int  # timed steps per round
    warmup: int
    rounds: int
    matmul_n: int
    matmul_reps: int
    mae_sizes: dict  # label -> (throughput.Size, batch)
    mae_parts: dict  # part -> the mae_sizes labels it times
    method_sizes: dict  # "tiny" / "base" -> (sections' size key, batch)
    compiled_methods: list[str] | None  # None: every method
    data_batch: int
    data_batches: int
    workers: int
    need_s: dict  # part -> seconds it usually takes (compiled: per model)


def make_plan(dry_run: bool) -> Plan:
    from throughput import SIZES, Size

    if dry_run:
        toy = Size("toy ViT-Tiny @16, dec 1x32", "vit_tiny_patch16_224", 16, 4, 192, 12, 3, 32, 1, 2, 2, 2)
        return Plan(
            device=torch.device("cpu"), dtype=None, steps=1, warmup=1, rounds=1, matmul_n=256, matmul_reps=2,
            mae_sizes={"toy": (toy, 2)}, mae_parts={"mae": ["toy"], "mae-compiled": ["toy"], "mae-tiny-compiled": []},
            method_sizes={"tiny": ("toy", 2)}, compiled_methods=["mae"], data_batch=8, data_batches=2, workers=1,
            need_s={},
        )  # fmt: skip
    return Plan(
        device=torch.device("cuda"), dtype=torch.bfloat16, steps=20, warmup=5, rounds=3, matmul_n=8192, matmul_reps=20,
        mae_sizes={"base": (SIZES["base"], 256), "tiny": (SIZES["tiny"], 1024)},
        mae_parts={"mae": ["base", "tiny"], "mae-compiled": ["base"], "mae-tiny-compiled": ["tiny"]},
        method_sizes={"tiny": ("tiny", 1024), "base": ("base", 128)}, compiled_methods=None, data_batch=1024,
        data_batches=20, workers=8,
        need_s={"matmul": 20, "mae": 60, "mae-compiled": 150, "data": 90, "methods-tiny": 60, "methods-base": 120,
                "mae-tiny-compiled": 100, "methods-tiny-compiled": 50, "methods-base-compiled": 90},  # guesses
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ measuring
def matmul_rate(device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data (two input sets in turn), median of `reps`."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [[torch.randn(n, n, device=device, generator=g).to(torch.bfloat16) for _ in range(2)] for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for a, b in sets * 3:  # warm-up: handles, clocks
        torch.matmul(a, b, out=out)
    times = []
    for i in range(reps):
        a, b = sets[i % 2]
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            torch.matmul(a, b, out=out)
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


class Captured:
    """A throughput-style `build(s) -> (model, step)` that keeps what it built, to count FLOPs after timing."""

    def __init__(self, build):
        self.build, self.built = build, None

    def __call__(self, s):
        self.built = self.build(s)
        return self.built


def counted_flops(captured: Captured, s, batch: int, plan: Plan) -> float | None:
    """Training FLOPs per image of one eager step (forward + backward) of the model `captured` built."""
    from torch.utils.flop_counter import FlopCounterMode

    if captured.built is None:
        return None
    model, step = captured.built
    x = torch.randn(batch, 3, s.image, s.image, device=plan.device)
    with FlopCounterMode(display=False) as counter:
        with autocast(plan.device, plan.dtype):
            loss = step(x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    captured.built = None  # let the model go
    return counter.get_total_flops() / batch


def utilisation(flops: float | None, img_per_s: float, rate: float | None) -> float | None:
    return round(flops * img_per_s / rate, 4) if flops and rate else None


@contextlib.contextmanager
def compile_mode(dry_run: bool):
    """A dry run walks the compiled parts' code with torch.compile as the identity: compiling on a CPU takes
    minutes, and says little about Inductor on a GPU (tests/test_compile.py and tests/test_cuda.py compile)."""
    if not dry_run:
        yield
        return
    real = torch.compile
    torch.compile = lambda fn=None, **_: fn
    try:
        yield
    finally:
        torch.compile = real


TOY_METHOD_SIZE = [  # sections.MODEL entry of a dry run: every method at toy size, 16 px
    "model.name=vit_tiny_patch16_224", "model.patch_size=4", "data.image_size=16", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
    "cmae.decoder_dim=32", "cmae.decoder_depth=1", "cmae.decoder_heads=2", "cmae.proj_hidden=64", "cmae.proj_dim=16",
    "conmim.proj_hidden=32", "conmim.proj_dim=16", "cim.generator_dim=32", "cim.generator_depth=1",
    "cim.generator_heads=2", "simmim.mask_patch_size=8", "cmae-huang.decoder_dim=32", "cmae-huang.decoder_depth=1",
    "cmae-huang.decoder_heads=2", "cmae-huang.proj_hidden=32", "cmae-huang.proj_dim=16", "dino.out_dim=64",
    "dino.head_hidden=32", "dino.head_bottleneck=16", "dino.local_crops=2",
]  # fmt: skip


def register_toy_size(tmp: Path) -> None:
    """sections.py knows 'tiny' and 'base'; a dry run adds 'toy', with the 16 px VQ tokenizer BEiT/CIM read
    placed where sections.tokenizer_dir looks for it."""
    import sections

    from mimkit.models.tokenizer import VQTokenizer, save_tokenizer

    sections.MODEL.setdefault("toy", TOY_METHOD_SIZE)
    if not (tmp / "tok-toy").exists():
        torch.manual_seed(0)
        save_tokenizer(VQTokenizer(vocab_size=32, downsample=4, width=8, code_dim=4, res_blocks=1, image_size=16),
                       tmp / "tok-toy")  # fmt: skip


# ------------------------------------------------------------------------------------------------ parts
class Speed:
    def __init__(self, ev, plan: Plan):
        self.ev, self.plan = ev, plan
        self.rate: float | None = None  # measured bf16 FLOP/s
        self.peak: float | None = None  # datasheet dense bf16 FLOP/s
        self.flops: dict = {}  # (size, name) -> counted FLOP per image
        self.rows: dict = {"mae": [], "methods": [], "data": []}

    def timing(self, s, batch: int, compiled: bool) -> tuple:
        p = self.plan
        return (s, batch, p.device, p.dtype, p.steps, p.warmup, compiled)

    def row(self, kind: str, part: str, size: str, name: str, r: dict, batch: int, compiled: bool, **extra) -> None:
        if "skipped" in r:
            self.ev.record(part, size=size, name=name, skipped=r["skipped"])
            return
        flops = extra.pop("flops", None) or self.flops.get((size, name))
        precision = str(self.plan.dtype).removeprefix("torch.") if self.plan.dtype else "fp32"
        rec = {"size": size, "name": name, "batch": batch, "compile": compiled, "precision": precision, **r,
               "gflop_per_img": round(flops / 1e9, 3) if flops else None, **extra,
               "mfu_measured": utilisation(flops, r["img_per_s"], self.rate),
               "mfu_datasheet": utilisation(flops, r["img_per_s"], self.peak)}  # fmt: skip
        self.ev.record(part, **rec)
        self.rows[kind].append(rec)

    def measure(self, part: str, builds: dict, s, batch: int, compiled: bool) -> dict:
        """harness.measure_many over `builds` (interleaved rounds); when that fails, each build alone, so one
        broken method costs its own row only. -> {name: result}."""
        try:
            return measure_many(builds, *self.timing(s, batch, compiled), rounds=self.plan.rounds)
        except Exception as e:  # noqa: BLE001
            name = next(iter(builds))
            self.ev.fail(f"{part} {name}" if len(builds) == 1 else f"{part} (interleaved)", e)
            torch._dynamo.reset()
            if len(builds) == 1:
                return {}
            return {k: v for n, b in builds.items() for k, v in self.measure(part, {n: b}, s, batch, compiled).items()}

    def matmul(self) -> None:
        from throughput import PEAK_BF16

        p = self.plan
        self.rate = matmul_rate(p.device, p.matmul_n, p.matmul_reps)
        name = torch.cuda.get_device_name() if p.device.type == "cuda" else "cpu"
        self.peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        self.ev.record("matmul", n=p.matmul_n, tflops_measured=round(self.rate / 1e12, 4),
                       tflops_datasheet=self.peak and self.peak / 1e12, device=name)  # fmt: skip

    def mae(self, part: str) -> None:
        """mimkit's MAE beside transformers' ViTMAE, each size in turn (interleaved rounds within a size)."""
        from throughput import IMPLS, train_flops_mae

        compiled, labels = "compiled" in part, self.plan.mae_parts[part]
        for label in labels:
            s, batch = self.plan.mae_sizes[label]
            need = self.plan.need_s.get(part, 0) / len(labels)
            if self.ev.left() < need:
                self.ev.skip(f"{part} {label}", f"needs about {need:.0f} s, {self.ev.left():.0f} s left")
                continue
            builds = {impl: Captured(IMPLS[impl]) for impl in ("mimkit", "transformers")}
            res = self.measure(f"{part} {label}", builds, s, batch, compiled)
            ref = res.get("transformers", {}).get("img_per_s")
            for impl, r in res.items():
                counted = counted_flops(builds[impl], s, batch, self.plan) if "skipped" not in r else None
                ratio = round(r["img_per_s"] / ref, 3) if ref and "img_per_s" in r else None
                self.row("mae", part, label, impl, r, batch, compiled, flops=train_flops_mae(s),
                         gflop_counted=counted and round(counted / 1e9, 3), vs_transformers=ratio)  # fmt: skip
            torch._dynamo.reset()

    def methods(self, size_key: str, compiled: bool) -> None:
        """Every method's step at one size: eager in one interleaved call; compiled one method at a time."""
        import sections

        from mimkit.methods import METHODS

        size, batch = self.plan.method_sizes[size_key]
        part = f"methods-{size_key}" + ("-compiled" if compiled else "")
        names = [m for m in METHODS if m != "tokenizer" and (not compiled or self.plan.compiled_methods is None
                                                              or m in self.plan.compiled_methods)]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            if size == "toy":
                register_toy_size(Path(tmp))
            s = SimpleNamespace(image=sections.image_size(size))
            builds = {m: Captured(sections.method_builder(m, size, batch, self.plan.device, Path(tmp))) for m in names}
            if not compiled:
                builds["beit, token ids given"] = Captured(
                    sections.mimkit_beit_ids_given(size, batch, self.plan.device, Path(tmp))
                )
                if size != "toy":  # transformers' BEiT knows sections' two sizes only
                    builds["beit (transformers)"] = Captured(sections.transformers_beit(size, batch, self.plan.device))
                groups = [builds]
            else:
                groups = [{m: b} for m, b in builds.items()]
            for group in groups:
                need = self.plan.need_s.get(part, 0) if compiled else 0
                if need and self.ev.left() < need:
                    self.ev.skip(
                        f"{part} {next(iter(group))}", f"needs about {need:.0f} s, {self.ev.left():.0f} s left"
                    )
                    continue
                res = self.measure(part, group, s, batch, compiled)
                for name, r in res.items():
                    if (size_key, name) not in self.flops and "skipped" not in r:
                        self.flops[(size_key, name)] = counted_flops(group[name], s, batch, self.plan)
                    self.row("methods", part, size_key, name, r, batch, compiled)
                    group[name].built = None
                torch._dynamo.reset()

    def data(self, data_dir: Path) -> None:
        """dataloader.py's paths on CIFAR-10 at 32 px (MAE's one view), on the stage's device."""
        import dataloader as dl

        p = self.plan
        cfg = dl.DataConfig(path=str(data_dir), image_size=32)
        source = dl.load_splits(cfg, seed=0, max_eval_images=1).train
        dataset = dl.ViewDataset(source, dl.VIEWS["mae"](32), cfg, seed=0)
        args = SimpleNamespace(batch_size=p.data_batch, batches=p.data_batches)
        paths = {
            f"Pillow loader, {p.workers} worker(s)": lambda: dl.pillow_loader(dataset, args, p.workers, p.device),
            "device cache": lambda: dl.device_cache(dataset, args, p.device),
            "device cache, fast crops": lambda: dl.device_cache(dataset, args, p.device, "fast"),
        }
        if p.device.type == "cuda":
            paths["GPU JPEG decode only (decode_jpeg)"] = lambda: dl.gpu_jpeg(source, args)
        for name, fn in paths.items():
            try:
                r = fn()
            except Exception as e:  # noqa: BLE001 — the other paths still get measured
                self.ev.fail(f"data: {name}", e)
                continue
            rec = {"path": name, "device": p.device.type, "images": len(source), "batch": p.data_batch, **r}
            self.ev.record("data", **rec)
            self.rows["data"].append(rec)


# ------------------------------------------------------------------------------------------------ summary
def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def summarise(ev, sp: Speed) -> None:
    if sp.rate:
        peak = f"{sp.peak / 1e12:.0f}" if sp.peak else "-"
        text = f"{sp.plan.matmul_n}^3: **{sp.rate / 1e12:.3g} TFLOP/s** measured; datasheet dense bf16 {peak} TFLOP/s"
        ev.section("bf16 matrix product", [text])
    head = ("| size | impl / method | compile | batch | img/s | ms/step | GFLOP/img | MFU (measured) | MFU (datasheet) "
            "| peak GB |")  # fmt: skip
    line = "|---|---|---|---|---|---|---|---|---|---|"

    def cells(r: dict) -> str:
        extra = (
            f" ({r['vs_transformers']:.2f}x transformers)"
            if r.get("vs_transformers") and r["name"] != "transformers"
            else ""
        )
        return (f"| {r['size']} | {r['name']}{extra} | {r['compile']} | {r['batch']} | {r['img_per_s']:.0f} | "
                f"{r['step_ms']:.1f} | {r['gflop_per_img'] or '-'} | {pct(r['mfu_measured'])} | "
                f"{pct(r['mfu_datasheet'])} | {r.get('peak_mem_gb', 0):.1f} |")  # fmt: skip

    if sp.rows["mae"]:
        best = max((r for r in sp.rows["mae"] if r["size"] == "base" and r["name"] == "mimkit"),
                   key=lambda r: r["img_per_s"], default=None)  # fmt: skip
        target = []
        if best:
            ratio = best.get("vs_transformers") or "-"
            target = ["", f"MAE ViT-B/16 @224 bf16, best mimkit row: **{best['img_per_s']:.0f} img/s** (target "
                      f">= 7,000), {ratio}x transformers in the same mode (target >= 2x)."]  # fmt: skip
        ev.section(
            "MAE beside transformers' ViTMAE (throughput.py)", [head, line, *map(cells, sp.rows["mae"]), *target]
        )
    if sp.rows["methods"]:
        ev.section("Every method's training step (sections.py, default settings)", [head, line,
                   *map(cells, sp.rows["methods"])])  # fmt: skip
    if sp.rows["data"]:
        body = ["| path | device | img/s | ms/batch | start-up s | cache build s |", "|---|---|---|---|---|---|"]
        for r in sp.rows["data"]:
            build = f"{r['build_s']:.1f}" if "build_s" in r else "-"
            body.append(f"| {r['path']} | {r['device']} | {r['img_per_s']:.0f} | {r['ms_per_batch']:.1f} | "
                        f"{r['startup_s']:.2f} | {build} |")  # fmt: skip
        body += ["", f"{sp.rows['data'][0]['images']} training images, batch {sp.plan.data_batch}, "
                 f"{sp.plan.data_batches} timed batches. End to end (data + step): the ladder stage."]  # fmt: skip
        ev.section("Data paths alone (dataloader.py)", body)


def speed(ev, args, data: Path | None) -> None:
    plan = make_plan(ev.dry_run)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_evidence: the speed stage needs a CUDA device (or --dry-run)")
    chosen = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_evidence: unknown --parts {unknown} (known: {', '.join(PARTS)})")
    sp = Speed(ev, plan)
    run = {
        "matmul": sp.matmul,
        "mae": lambda: sp.mae("mae"),
        "mae-compiled": lambda: sp.mae("mae-compiled"),
        "mae-tiny-compiled": lambda: sp.mae("mae-tiny-compiled"),
        "data": (lambda: sp.data(data)) if data else None,
        "methods-tiny": lambda: sp.methods("tiny", False),
        "methods-base": lambda: sp.methods("base", False),
        "methods-tiny-compiled": lambda: sp.methods("tiny", True),
        "methods-base-compiled": lambda: sp.methods("base", True),
    }
    with compile_mode(ev.dry_run):
        for part in [p for p in PARTS if p in chosen]:
            if run[part] is None:
                ev.skip(part, "no --data")
            elif (part.startswith("methods-") and part.split("-")[1] not in plan.method_sizes) or (
                part.startswith("mae") and not plan.mae_parts[part]
            ):
                ev.skip(part, "dry run: one toy size on the CPU")
            else:
                per_model = part.endswith("compiled") and part.startswith("methods")  # weighed inside
                attempt(ev, part, run[part], need_s=0 if per_model else plan.need_s.get(part, 0))
            summarise(ev, sp)
            ev.write_summary()  # after every part: a stage cut short still leaves its tables
