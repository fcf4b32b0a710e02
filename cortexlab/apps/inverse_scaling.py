"""The `inverse_scaling` dashboard: the curves of experiments E1-E4 from `results/*.json`, each with its baselines,
and a tiny live E1 (MQAR) trained on the spot with a progress bar.

The committed figures come from `cortexlab.viz.experiments`; the live run calls `cortexlab.train.mqar.train_mqar`
(its `on_step` callback drives the progress bar). In a served page the live run trains in a worker thread so that
the page keeps updating and other browser sessions keep being served; one live run at a time per process.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import panel as pn
import param

from cortexlab.results import RECALL_RESULT
from cortexlab.viz import experiments as viz

from . import APPS, common

__all__ = ["EXPERIMENTS", "INTRO", "LIVE_MIXERS", "TITLE", "InverseScalingApp"]

TITLE = APPS["inverse_scaling"][0]
INTRO = ("Does the memory make the model better as the context grows? The claim is split into four experiments, "
         "each a command that writes `results/<name>.json`. Choose one in the sidebar: its curves are drawn with "
         "every baseline it measured, and the numbers and the command that produced them are listed below. "
         "E1 also has a tiny live version you can train here in a minute or so.")

E1, E2, E3, E4 = "E1 MQAR", "E2 recall across calls", "E3 loss by position", "E4 v1 vs v2"
EXPERIMENTS = {E1: "mqar_cpu.json", E2: RECALL_RESULT, E3: "longtext_loss.json",
               E4: "cortex_v1_v2.json"}
E1_COMMAND = "python -m cortexlab.train mqar --out results/mqar_cpu.json"
E1_CAPACITY = ("mqar_capacity.json", "mqar_capacity_d128.json")   # E1's capacity sweeps, drawn with the grid if present
BASELINES = {
    E1: "Baselines: **chance** (dotted) = 1 / number of values; **untrained accuracy** = the same model before "
        "training. Full attention keeps every pair (its state grows with the length); the sliding window sees only "
        "its last W tokens; the GDN and the hybrid hold the pairs in a fixed-size state.",
    E2: "Baselines: **reset** = the same sidecar with its memory cleared before the question call (so any recall "
        "must come from the memory carried across calls); **base** = SmolLM2 alone, whose context restarts at every "
        "call; **chance** (dotted) = guessing the 5-digit key.",
    E3: "Baselines: **base, segments** = the floor (the context restarts at every segment); **sidecar, memory "
        "reset every segment** = the sidecar without carrying its memory; **base, full context** = the ceiling, "
        "the model reading the whole document at once.",
    E4: "v1 = the prototype (per-token loop, bias-hack gate); v2 = the production block (chunkwise gated delta "
        "rule + sliding window, log-space gate). Dotted retention curves: the forget gate alone, without "
        "overwriting by later writes.",
}
LIVE_MIXERS = ("sliding_window", "gdn")
LIVE_STEPS = 300
_LIVE_LOCK = threading.Lock()   # one live run per server process (the machine has few cores)


def _live_configs(steps: int) -> list:
    """The tiny E1 of notebook 06: L=32, 4 pairs, vocabulary 32, d=64, a 4-token window; at most `steps` steps."""
    from cortexlab.data.mqar import MQARTask
    from cortexlab.train.mqar import MQARTrainConfig

    task = MQARTask(vocab_size=32, seq_len=32, num_pairs=4)
    return [MQARTrainConfig(task=task, mixer=mixer, d_model=64, num_heads=2, window_size=4, steps=steps,
                            batch_size=32, lr=1e-2, warmup_steps=min(20, steps - 1), test_size=256,
                            eval_every=min(50, steps), stop_accuracy=0.99) for mixer in LIVE_MIXERS]


class InverseScalingApp(pn.viewable.Viewer):
    """E1-E4 from the committed results, and a live tiny E1."""

    experiment = param.Selector(default=E2, objects=list(EXPERIMENTS), doc="the experiment shown")

    def __init__(self, results: str | Path | None = None, *, live_steps: int = LIVE_STEPS, **params):
        super().__init__(**params)
        self._results = Path(results) if results is not None else None
        self._live_steps = live_steps
        self.message = pn.pane.Alert("", alert_type="warning", visible=False, sizing_mode="stretch_width")
        self.figure_pane = pn.pane.Plotly(None, sizing_mode="stretch_width", min_width=420)
        self.extra_pane = pn.pane.Plotly(None, sizing_mode="stretch_width", visible=False)
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.live_pane = pn.pane.Plotly(None, width=460, visible=False)
        self.progress = pn.indicators.Progress(value=0, max=1, bar_color="success",
                                               sizing_mode="stretch_width")
        self.live_status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.run_button = pn.widgets.Button(label="Run live tiny E1", color="primary")
        self.run_button.on_click(self._on_run)
        self._update()

    def _folder(self) -> Path:
        return self._results if self._results is not None else common.results_dir()

    def _load(self, name: str) -> dict:
        return json.loads((self._folder() / name).read_text())

    def _has(self, name: str) -> bool:
        return (self._folder() / name).is_file()

    @param.depends("experiment", watch=True)
    def _update(self) -> None:
        """Redraw the figure, the numbers and the live section for the chosen experiment."""
        name = EXPERIMENTS[self.experiment]
        self.run_button.disabled = self.experiment != E1 or _LIVE_LOCK.locked()
        self.live_pane.visible = self.experiment == E1 and self.live_pane.object is not None
        try:
            results = self._load(name)
            if self.experiment == E1:
                results = viz.mqar_merge(results, *(self._load(n) for n in E1_CAPACITY if self._has(n)))
            figures = self._figures(results)
            commands = "; ".join(f"`{c}`" for c in results.get("commands", [results["command"]]))
            summary = f"{self._numbers(results)}\n\n{BASELINES[self.experiment]}\n\nCommand: {commands}"
        except FileNotFoundError:
            command = f" Run `{E1_COMMAND}` to produce it (hours on a CPU)." if self.experiment == E1 else ""
            live = " Meanwhile, **Run live tiny E1** trains a small version here." if self.experiment == E1 else ""
            self._show_missing(f"`results/{name}` has not been produced yet.{command}{live}")
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            self._show_missing(f"`results/{name}` could not be read: {type(err).__name__}: {err}")
            return
        self.message.visible = False
        self.figure_pane.object, self.figure_pane.visible = figures[0], True
        self.extra_pane.object = figures[1] if len(figures) > 1 else None
        self.extra_pane.visible = len(figures) > 1
        self.summary.object = summary

    def _show_missing(self, text: str) -> None:
        self.message.object, self.message.visible = text, True
        self.figure_pane.object, self.figure_pane.visible = None, False
        self.extra_pane.object, self.extra_pane.visible = None, False
        self.summary.object = BASELINES[self.experiment]

    def _figures(self, r: dict) -> list:
        if self.experiment == E1:
            return [viz.mqar_figure(r)]
        if self.experiment == E2:
            return [viz.recall_figure(r["eval"], call_tokens=r["config"]["call_tokens"])]
        if self.experiment == E3:
            return [viz.position_loss_figure(r["eval"], r["config"]["segment_tokens"])]
        return [viz.throughput_figure(r["throughput"]["rows"]), viz.version_retention_figure(r["persistence"])]

    def _numbers(self, r: dict) -> str:
        """The key numbers of a results file, as Markdown."""
        if self.experiment == E1:
            rows = viz.mqar_rows(r["runs"])
            settings = list(dict.fromkeys((row["seq_len"], row["pairs"]) for row in rows))   # in grid order
            acc = {(row["mixer"], row["size"], row["seq_len"], row["pairs"]): row["accuracy"] for row in rows}
            lines = ["| mixer | size | " + " | ".join(f"L={L}, {P} pairs" for L, P in settings) + " |",
                     "|---|---|" + "---|" * len(settings)]
            for mixer, size in dict.fromkeys((row["mixer"], row["size"]) for row in rows):
                cells = [acc.get((mixer, size, L, P)) for L, P in settings]
                lines.append(f"| {mixer} | {size} | "
                             + " | ".join("not run yet" if a is None else f"{a:.3f}" for a in cells) + " |")
            state = "complete grid" if r.get("complete") else "partial grid (the run is still going or was cut short)"
            return f"**{state}**; chance {min(row['chance'] for row in rows):.3f}.\n\n" + "\n".join(lines)
        if self.experiment == E2:
            ev = r["eval"]
            lines = ["| distance (calls) | " + " | ".join(d for d in ev["sidecar"]) + " |",
                     "|---|" + "---|" * len(ev["sidecar"])]
            for variant in ("sidecar", "reset", "base"):
                lines.append(f"| {variant} | " + " | ".join(f"{x['exact_match']:.2f}" for x in ev[variant].values())
                             + " |")
            return (f"Exact match on {r['eval_set']['examples']} held-out episodes of "
                    f"{r['config']['call_tokens']}-token calls (chance {ev['chance']['exact_match']:g}); "
                    f"trained {r['train_seconds'] / 60:.0f} min on "
                    f"{r['environment'].get('cpu_count', '?')} CPU cores.\n\n" + "\n".join(lines))
        if self.experiment == E3:
            ev = r["eval"]
            lines = ["| variant | first segment | later segments | all |", "|---|---|---|---|"]
            for variant in ("base_segments", "sidecar_reset", "sidecar_segments", "base_full_context"):
                lines.append(f"| {viz.VARIANT_STYLE[variant][0]} | {ev['first_segment'][variant]:.3f} | "
                             f"{ev['later_segments'][variant]:.3f} | {ev['mean'][variant]:.3f} |")
            return (f"Mean next-token loss (nats) on {len(ev['documents'])} held-out modules read in "
                    f"{r['config']['segment_tokens']}-token segments.\n\n" + "\n".join(lines))
        from cortexlab.eval.versions import versions_table

        lines = ["| metric | v1 | v2 |", "|---|---|---|"]
        lines += [f"| {row['metric']} | {row['v1']} | {row['v2']} |" for row in versions_table(r)]
        return "\n".join(lines)

    def run_live(self) -> dict:
        """Train the tiny E1 (one model per mixer in LIVE_MIXERS), advancing `progress` every step; returns the
        results by mixer (without their models) and shows them in `live_pane`. Another run in progress: {}."""
        if not _LIVE_LOCK.acquire(blocking=False):
            self.live_status.object = "Another live run is in progress on this server; try again in a minute."
            return {}
        try:
            self.run_button.disabled = True
            self.progress.value = -1                    # indeterminate while the trainer loads
            self.live_status.object = "Loading the trainer (about 10 s, once per server)..."
            from cortexlab.train.mqar import train_mqar

            configs = _live_configs(self._live_steps)
            self.progress.max, self.progress.value = sum(c.steps for c in configs), 0
            runs, done = {}, 0
            for cfg in configs:
                self.live_status.object = f"Training {cfg.mixer}..."

                def advance(step, loss, offset=done):
                    self.progress.value = offset + step

                run = train_mqar(cfg, progress=False, on_step=advance)
                run.pop("model")
                runs[cfg.mixer] = run
                done += cfg.steps                       # a run that stopped early skips its remaining steps
                self.progress.value = done
            self.live_pane.object = viz.mqar_live_figure(
                runs, title=f"E1 live: L={cfg.task.seq_len}, {cfg.task.num_pairs} pairs, "
                            f"W={cfg.window_size}, d={cfg.d_model}")
            self.live_pane.visible = self.experiment == E1
            self.live_status.object = "Done: " + "; ".join(
                f"{m} {r['accuracy']:.2f} (untrained {r['untrained_accuracy']:.2f}, {r['steps']} steps, "
                f"{r['train_seconds']:.0f} s)" for m, r in runs.items()) + f"; chance {run['chance']:.3f}."
            return runs
        finally:
            _LIVE_LOCK.release()
            self.run_button.disabled = self.experiment != E1

    async def _on_run(self, event=None) -> None:
        """The button: train in a worker thread so that the progress bar reaches the browser as it moves."""
        try:
            await asyncio.to_thread(self.run_live)
        except Exception as err:    # shown on the page rather than lost in the server log
            self.live_status.object = f"The live run failed: {type(err).__name__}: {err}"
            self.progress.value = 0          # not left spinning or part-filled

    def controls(self) -> pn.Column:
        """The sidebar: the experiment, and the live run with its progress."""
        return pn.Column(
            pn.widgets.Select.from_param(self.param.experiment, label="experiment"),
            pn.pane.Markdown("**Live tiny E1**: MQAR at length 32 with 4 pairs, vocabulary 32; a sliding window of "
                             "4 tokens (7 with the short conv) vs the GDN (d=64, 2 heads), at most "
                             f"{self._live_steps} steps each (about a minute). Choose E1 to run it."),
            self.run_button, self.progress, self.live_status)

    def __panel__(self) -> pn.Column:
        return pn.Column(self.message, pn.Row(self.figure_pane, self.live_pane, sizing_mode="stretch_width"),
                         self.extra_pane, self.summary, sizing_mode="stretch_width")

    def page(self) -> pn.template.FastListTemplate:
        return common.page(TITLE, INTRO, self, sidebar=[self.controls()])
