"""A Piper voice's network cut in two, so speech leaves window by window.

Piper's VITS graph runs text encoder, duration predictor and flow (the *front*, ~20 ms
whatever the length) and then the HiFi-GAN decoder, whose cost grows with the audio (a
second of speech ~40 ms on two cores). Run whole, a clause's first sample waits for its
last. The decoder is a stack of convolutions over the latent frames ``z`` (one per
``hop_length`` samples), so a window of frames decoded with ``context`` frames of
neighbours on each side gives the very samples the whole run gives (12 frames: identical
to float precision for the bundled voice; 4: audible clicks). So the front runs once
per clause and the decoder window by window: the first ~0.19 s of audio is out after
~12 ms of decoding instead of after the whole clause.

The cut is found, not assumed: the decoder is the nodes named ``/dec/...`` (how Piper's
export names them) and it must read exactly one tensor from the rest. A voice exported
otherwise (or a multi-speaker one, whose decoder also reads the speaker) runs whole.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DECODER_PREFIX = "/dec/"


@dataclass
class Graphs:
    """Graphs, serialized or as file paths: ``front`` (ids → z, alignments) and ``decoder``
    (z → audio), or ``front`` the whole voice and ``decoder`` None when it cannot be cut."""

    front: bytes | str
    decoder: bytes | str | None = None
    latent: str = ""  # the tensor between the two
    #: already optimized by ONNX Runtime for this machine (see :mod:`giris.workers.onnx_cache`)
    optimized: bool = False


def load_graphs(model: Path) -> Graphs:
    import onnx
    from onnx.utils import Extractor
    from piper.patch_voice_with_alignment import add_alignment_output

    graph = onnx.load(str(model))
    try:
        add_alignment_output(graph)
    except ValueError:
        pass  # already patched, or a voice without alignments: use it as it is
    latent = decoder_input(graph)
    if latent is None:
        return Graphs(front=graph.SerializeToString())
    outputs = [o.name for o in graph.graph.output]
    try:
        if latent not in {v.name for v in graph.graph.value_info}:  # the cut needs its type
            graph = onnx.shape_inference.infer_shapes(graph)
        ex = Extractor(graph)
        front = ex.extract_model([i.name for i in graph.graph.input], [latent, *outputs[1:]])
        decoder = ex.extract_model([latent], outputs[:1])
    except Exception:  # noqa: BLE001 - a graph that will not come apart still runs whole
        return Graphs(front=graph.SerializeToString())
    if not (_closed(front) and _closed(decoder)):
        return Graphs(front=graph.SerializeToString())  # the audio needs more than z: run whole
    return Graphs(front.SerializeToString(), decoder.SerializeToString(), latent)


def _closed(model: Any) -> bool:
    """Whether every tensor a node reads is a graph input, a weight or made by a node (an
    extracted part that still needs something from the other part is not)."""
    g = model.graph
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    return all(not i or i in known for n in g.node for i in n.input)


def decoder_input(graph: Any) -> str | None:
    """The one tensor the decoder reads from the rest of the graph, or None."""
    nodes = [n for n in graph.graph.node if n.name.startswith(DECODER_PREFIX)]
    if not nodes:
        return None
    made = {o for n in nodes for o in n.output}
    weights = {t.name for t in graph.graph.initializer}
    outside = {i for n in nodes for i in n.input if i and i not in made and i not in weights}
    return outside.pop() if len(outside) == 1 else None


class VoiceNet:
    """ONNX Runtime sessions for one voice on ``threads`` threads.

    With more than one thread, each runs on a CPU of its own (``cpus``: the worker's,
    the calling thread on the first, ONNX Runtime's pool threads on the next ones). Left
    to the scheduler, the pool thread that the caller wakes for every operator is put on
    the caller's CPU ("wake affine") and the two take turns on one core while the other
    idles: measured in the worker, the front took 35-57 ms with ~130 preemptions
    instead of ~25 ms with none.
    """

    def __init__(self, graphs: Graphs, threads: int, cuda: bool, cpus: list[int] | None = None) -> None:
        threads = max(1, threads)
        self.pin = sorted(cpus)[:threads] if cpus and threads > 1 and len(cpus) >= threads else None
        affinity = ";".join(str(c + 1) for c in self.pin[1:]) if self.pin else None  # 1-based
        opt = graphs.optimized
        self.front = session(graphs.front, threads, cuda, affinity, opt)
        self.decoder = session(graphs.decoder, threads, cuda, affinity, opt) if graphs.decoder else None
        self.latent = graphs.latent

    @contextmanager
    def _pinned(self) -> Iterator[None]:
        if self.pin is None:
            yield
            return
        before: set[int] | None = os.sched_getaffinity(0)  # this thread's (Linux: per thread)
        try:
            os.sched_setaffinity(0, {self.pin[0]})
        except OSError:  # the CPU was taken from us (a cpuset changed): run unpinned
            before = None
        try:
            yield
        finally:
            if before is not None:
                os.sched_setaffinity(0, before)

    def run_front(self, args: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(latent frames (1, C, T), or the audio itself when the voice runs whole;
        frames per phoneme id, or None without alignments)."""
        with self._pinned():
            out = self.front.run(None, args)
        return out[0], (np.asarray(out[1]).reshape(-1) if len(out) > 1 else None)

    def decode(self, z: np.ndarray, start: int, stop: int, context: int, hop: int) -> np.ndarray:
        """Samples of latent frames ``[start, stop)``, with ``context`` frames either side
        decoded too and cut away."""
        lo, hi = max(0, start - context), min(z.shape[2], stop + context)
        with self._pinned():
            y = self.decoder.run(None, {self.latent: np.ascontiguousarray(z[:, :, lo:hi])})[0]  # type: ignore[union-attr]
        y = np.asarray(y, np.float32).reshape(-1)
        return y[(start - lo) * hop:(stop - lo) * hop]


def windows(total: int, first: int, largest: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` frame windows covering ``total``: ``first`` frames, then twice as
    many each time up to ``largest``; a tail shorter than half a window joins the last."""
    start, size = 0, max(1, first)
    while start < total:
        stop = min(total, start + size)
        if total - stop < size // 2:
            stop = total
        yield start, stop
        start, size = stop, min(size * 2, max(largest, first))


def session(graph: bytes | str, threads: int = 1, cuda: bool = False, affinity: str | None = None,
            optimized: bool = False, save_to: str | None = None) -> Any:
    """An ONNX Runtime session; ``optimized``: the graph needs no more optimizing (one
    ONNX Runtime wrote, ``save_to``), which makes a voice's front load in ~0.25 s, not ~1 s."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    if affinity:
        opts.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    # idle ONNX threads sleep instead of spinning: the stages downstream need the cores
    # the moment a chunk is out, while the next one is being synthesized
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized:
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to:
        opts.optimized_model_filepath = save_to
        opts.log_severity_level = 3  # not its "for this machine only" warning: we know
    providers: list[Any] = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                            else ["CPUExecutionProvider"])
    return onnxruntime.InferenceSession(graph, sess_options=opts, providers=providers)
