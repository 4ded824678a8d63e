"""A Piper voice's network cut in three, so speech leaves window by window.

Piper's VITS graph runs a text encoder and duration predictor over the phonemes (the
*prior*: its cost grows with the phonemes), a normalizing flow over the latent frames
``z`` (one per ``hop_length`` samples) and the HiFi-GAN decoder over them (both grow with
the audio: a second of speech ~20 ms of flow and ~40 ms of decoder on one core). Run
whole, a clause's first sample waits for its last. The flow's coupling layers and the
decoder are stacks of convolutions, so a window of frames computed with enough
neighbours on each side gives the very values the whole run gives: 32 frames for the flow
(four couplings of four 5-tap layers), 12 for the decoder (identical to float precision
for the bundled voice; 4: audible clicks). So the prior runs once per clause, and the
decoder window by window, the flow over the first window's frames (and its context)
first: the first ~0.05 s of audio is out after the prior, ~48 frames of flow and ~9 ms
of decoding, instead of after the whole clause.

The cuts are found, not assumed: the decoder is the nodes named ``/dec/...`` (how Piper's
export names them) and it must read exactly one tensor from the rest; the flow is what
lies between the tensors the ``/flow/...`` nodes read from outside it and that one. A
voice exported otherwise runs its front (prior and flow) whole, or the whole voice at
once when not even the decoder is found (a multi-speaker one, whose decoder also reads
the speaker).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

DECODER_PREFIX = "/dec/"
FLOW_PREFIX = "/flow/"
#: latent frames either side of a window that the flow needs to give a whole run's values
FLOW_CONTEXT = 32


@dataclass
class Graphs:
    """Graphs, serialized or as file paths: ``front`` (ids → z, alignments) and ``decoder``
    (z → audio), or ``front`` the whole voice and ``decoder`` None when it cannot be cut.
    With ``flow``, the front stops before the flow (ids → the flow's inputs, alignments)
    and ``flow`` makes z from them."""

    front: bytes | str
    decoder: bytes | str | None = None
    latent: str = ""  # the tensor the decoder reads
    flow: bytes | str | None = None
    #: the flow's inputs (the front's first outputs, each with the frames as its last axis)
    flow_inputs: tuple[str, ...] = ()
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
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    try:
        if latent not in {v.name for v in graph.graph.value_info}:  # the cut needs its type
            graph = onnx.shape_inference.infer_shapes(graph)
        ex = Extractor(graph)
        decoder = ex.extract_model([latent], outputs[:1])
        front = ex.extract_model(inputs, [latent, *outputs[1:]])
    except Exception:  # noqa: BLE001 - a graph that will not come apart still runs whole
        return Graphs(front=graph.SerializeToString())
    if not (_closed(front) and _closed(decoder)):
        return Graphs(front=graph.SerializeToString())  # the audio needs more than z: run whole
    whole_front = Graphs(front.SerializeToString(), decoder.SerializeToString(), latent)
    feeds = flow_inputs(graph)
    if not feeds:
        return whole_front
    try:
        prior = ex.extract_model(inputs, [*feeds, *outputs[1:]])
        flow = ex.extract_model(feeds, [latent])
    except Exception:  # noqa: BLE001 - the flow stays in the front
        return whole_front
    if not (_closed(prior) and _closed(flow)) or len(flow.graph.node) + len(prior.graph.node) != len(front.graph.node):
        return whole_front  # not a clean cut: something of the front would run twice or never
    return Graphs(prior.SerializeToString(), whole_front.decoder, latent,
                  flow.SerializeToString(), tuple(feeds))


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


def flow_inputs(graph: Any) -> list[str]:
    """The tensors the flow reads from the front (made outside it, by nodes that do not
    depend on the flow), or [] when there is no ``/flow/`` to find.

    Nodes the exporter left unnamed inside the flow (its gated activations) depend on
    named flow nodes, so they count as the flow's, not as its inputs."""
    nodes = graph.graph.node
    flow = [n for n in nodes if n.name.startswith(FLOW_PREFIX)]
    if not flow:
        return []
    after = {o for n in flow for o in n.output}  # made by the flow or by what it feeds
    for n in nodes:  # topological order
        if not n.name.startswith(FLOW_PREFIX) and any(i in after for i in n.input):
            after.update(n.output)
    weights = {t.name for t in graph.graph.initializer}
    feeds = []
    for n in flow:
        for i in n.input:
            if i and i not in after and i not in weights and i not in feeds:
                feeds.append(i)
    return feeds


class VoiceNet:
    """ONNX Runtime sessions for one voice on ``threads`` threads.

    With more than one thread, each runs on a CPU of its own (``cpus``: the worker's,
    the calling thread on the first, ONNX Runtime's pool threads on the next ones). Left
    to the scheduler, the pool thread that the caller wakes for every operator is put on
    the caller's CPU ("wake affine") and the two take turns on one core while the other
    idles: measured in the worker, the front took 35-57 ms with ~130 preemptions
    instead of ~25 ms with none.
    """

    def __init__(self, graphs: Graphs, threads: int, cuda: bool, cpus: list[int] | None = None,
                 spin: bool = False) -> None:
        threads = max(1, threads)
        self.pin = sorted(cpus)[:threads] if cpus and threads > 1 and len(cpus) >= threads else None
        affinity = ";".join(str(c + 1) for c in self.pin[1:]) if self.pin else None  # 1-based
        opt = graphs.optimized
        spin = spin and threads > 1
        self.front = session(graphs.front, threads, cuda, affinity, opt, spin=spin)
        self.decoder = session(graphs.decoder, threads, cuda, affinity, opt, spin=spin) if graphs.decoder else None
        self.flow = (session(graphs.flow, threads, cuda, affinity, opt, spin=spin)
                     if graphs.flow and graphs.decoder else None)
        self.flow_inputs = graphs.flow_inputs if self.flow is not None else ()
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

    def run_front(self, args: dict[str, np.ndarray], head: bool = False) -> tuple[Latent, np.ndarray | None]:
        """(the clause's latent frames, to decode by window (for a voice that runs whole,
        its audio); frames per phoneme id, or None without alignments). ``head``: the
        first window is wanted as soon as can be (see :class:`Latent`)."""
        n = max(1, len(self.flow_inputs))
        with self._pinned():
            out = self.front.run(None, args)
        parts = out[:n]
        # a head needs every input of the flow to run over the frames (last axis), as the
        # bundled voice's do; anything else gets the whole clause's flow at once
        framed = all(np.ndim(p) >= 2 and np.shape(p)[-1] == np.shape(parts[0])[-1] for p in parts)
        lat = Latent(parts, head and framed)
        if self.flow is None:
            lat.z, lat.valid = out[0], lat.frames
        return lat, (np.asarray(out[n]).reshape(-1) if len(out) > n else None)

    def decode(self, lat: Latent, start: int, stop: int, context: int, hop: int) -> np.ndarray:
        """Samples of latent frames ``[start, stop)``, with ``context`` frames either side
        decoded too and cut away."""
        lo, hi = max(0, start - context), min(lat.frames, stop + context)
        with self._pinned():
            if lat.valid < hi:
                self._flow(lat, hi)
            z = np.ascontiguousarray(lat.z[:, :, lo:hi])  # type: ignore[index]
            y = self.decoder.run(None, {self.latent: z})[0]  # type: ignore[union-attr]
        y = np.asarray(y, np.float32).reshape(-1)
        return y[(start - lo) * hop:(stop - lo) * hop]

    def flow_all(self, lat: Latent) -> None:
        """The whole clause's z now (the decoder would make it on first need)."""
        if self.flow is not None and lat.valid < lat.frames:
            with self._pinned():
                self._flow(lat, lat.frames)

    def _flow(self, lat: Latent, hi: int) -> None:
        """z up to frame ``hi`` at least: the whole clause's, or only a head of it for a
        head request (the flow over ``FLOW_CONTEXT`` frames more than asked, or than
        ``lat.reach``)."""
        total = lat.frames
        end = min(total, max(hi, lat.reach) + FLOW_CONTEXT) if lat.head and lat.valid == 0 else total
        feed = {name: (x if end == total else np.ascontiguousarray(x[..., :end]))
                for name, x in zip(self.flow_inputs, lat.parts)}
        lat.z = self.flow.run(None, feed)[0]  # type: ignore[union-attr]
        lat.valid = total if end == total else end - FLOW_CONTEXT


@dataclass
class Latent:
    """One clause's latent frames ``z`` (1, C, T), made as the decoder asks for them.

    ``parts`` is what the front gave: z itself, or the flow's inputs (each with the T
    frames last), from which the flow makes z on first need: the whole clause at once,
    except for a ``head`` request (the utterance's first window), where the flow first
    runs over that window, its decoder context and ``FLOW_CONTEXT`` frames more (~52
    frames, not the clause's 100-300), and over the whole clause when a window past the
    head is asked for. The caller may stretch the head to ``reach`` frames, so that the
    second window is made from it too: a second window that waits for the whole clause's
    flow costs ~55 ms for 0.09 s of speech, when four live sessions start together each
    one's turn. That costs one head of flow per utterance; a flow by window would redo
    ~90 frames of context for every window."""

    parts: list[np.ndarray]
    head: bool = False
    #: frames of z the head is to make final, when more than its first window needs
    reach: int = 0
    z: np.ndarray | None = None
    valid: int = 0  # frames of z that are final

    @property
    def frames(self) -> int:
        return int(self.parts[0].shape[-1])


def windows(total: int, first: int, largest: int,
            least: Callable[[], int] = lambda: 0) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` frame windows covering ``total``: ``first`` frames, then twice as
    many each time up to ``largest``; a tail shorter than half a window joins the last.
    Lazily: each window after the first is at least ``least()`` frames (asked when it is
    its turn), so a stream that finds itself crowded grows its windows sooner."""
    start, size = 0, max(1, first)
    while start < total:
        if start:
            size = min(max(size, least()), max(largest, first))
        stop = min(total, start + size)
        if total - stop < size // 2:
            stop = total
        yield start, stop
        start, size = stop, min(size * 2, max(largest, first))


def session(graph: bytes | str, threads: int = 1, cuda: bool = False, affinity: str | None = None,
            optimized: bool = False, save_to: str | None = None, spin: bool = False) -> Any:
    """An ONNX Runtime session; ``optimized``: the graph needs no more optimizing (one
    ONNX Runtime wrote, ``save_to``), which makes a voice's front load in ~0.25 s, not ~1 s;
    ``spin``: its pool threads spin between the operators of a run (see below)."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    if affinity:
        opts.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    # Idle ONNX threads sleep instead of spinning: the stages downstream need the cores
    # the moment a chunk is out, while the next one is being synthesized. The sessions of
    # an utterance's first window (the viewer's wait) spin within a run: woken by a futex
    # for each of the graphs' hundreds of small operators, the first chunk took ~27 ms
    # instead of ~22 (in-process, alternated); they stop spinning when the run returns.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized:
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_to:
        opts.optimized_model_filepath = save_to
        opts.log_severity_level = 3  # not its "for this machine only" warning: we know
    # cuDNN's default is an exhaustive search of convolution algorithms per new input
    # shape, and decoder windows come in many lengths: each would pay it on first sight
    providers: list[Any] = ([("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
                             "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
    return onnxruntime.InferenceSession(graph, sess_options=opts, providers=providers)
