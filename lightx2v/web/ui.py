"""The Gradio page: `python -m lightx2v.web.ui`.

    python -m lightx2v.web.ui --model tiny-wan --device cpu          # the model in this process
    python -m lightx2v.web.ui --server http://gpu-box:8000 --api-key KEY   # a running `lightx2v serve`

One tab per task the model has (text-to-video, image-to-video, text-to-image, image edit); each
tab's inputs are the request's fields with the model's defaults and limits (lightx2v/web/forms.py
derives them from `GenerationRequest` and the spec), a Generate and a Cancel button, a progress
bar fed by the denoising steps, the result, and the seed used (with a button that puts it back
into the seed input). In server mode a History tab lists the service's recent jobs.

Offline: analytics off (before gradio is imported), no share link, no server-side rendering (it
would need Node), and the default theme, whose fonts ship with gradio: the page loads nothing
from outside the machine it is served from (tests/ui/test_page_browser.py checks every request
the browser makes).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Any, Sequence

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check, whatever the env says

from lightx2v.web.backends import API_KEY_ENV, Backend, Job, Outcome  # noqa: E402
from lightx2v.web.forms import (OFF, RANDOM_SEED, FormField, form_for, is_random_weights,  # noqa: E402
                                request_values, task_label, tasks_of)

POLL_S = 0.1
"""How often a waiting handler reads its job's progress."""
SLIDER_MAX_POSITIONS = 1100
"""Integer inputs with at most this many values are sliders, the others number boxes."""
HISTORY_COLUMNS = ["id", "status", "progress", "prompt", "size", "frames", "seed", "created"]


def _no_proxy_for_localhost() -> None:
    """launch() checks its own URL over HTTP: keep a configured proxy away from it."""
    if any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")):
        for key in ("no_proxy", "NO_PROXY"):
            hosts = [h for h in os.environ.get(key, "").split(",") if h]
            os.environ[key] = ",".join(dict.fromkeys(hosts + ["127.0.0.1", "localhost"]))


# ----------------------------------------------------------------------------- the page


class Page:
    """The page of one backend. `blocks` is the Gradio app; `build()` makes it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.jobs: dict[tuple[str, str], Job] = {}
        """The running job of each (browser session, task), for Cancel."""

    # -- layout
    def build(self):
        import gradio as gr

        b = self.backend
        with gr.Blocks(title=f"LightX2V - {b.name}", analytics_enabled=False,
                       delete_cache=(3600, 24 * 3600)) as blocks:
            gr.Markdown(self._header(), elem_id="header")
            if is_random_weights(b.spec):
                gr.Markdown(f"**{b.spec.name} has random weights: its outputs are noise.** It is a "
                            "tiny model for trying the page on any machine; start the page with "
                            "`--model` naming real weights (or a service running them) for real "
                            "videos.", elem_id="noise-warning")
            history_outputs = None
            generate_events = []
            with gr.Tabs():
                for task in tasks_of(b.spec):
                    with gr.Tab(task_label(task), id=task, elem_id=f"tab-{task}"):
                        generate_events.append(self._task_tab(task))
                if b.history:
                    with gr.Tab("History", id="history", elem_id="tab-history"):
                        history_outputs = self._history_tab(blocks)
            if history_outputs is not None:  # a finished job appears in the history at once
                for event in generate_events:
                    event.then(self.history_rows, outputs=history_outputs)
        self.blocks = blocks
        return blocks

    def _header(self) -> str:
        b = self.backend
        tasks = ", ".join(task_label(t).lower() for t in tasks_of(b.spec))
        where = (f"served by {b.url}" if b.mode == "server"
                 else f"in this process on {b.model.options.device} ({b.model.options.dtype})")
        return f"## LightX2V\nModel **{b.name}** ({tasks}), {where}."

    def _task_tab(self, task: str):
        import gradio as gr

        form = form_for(self.backend.spec, task, self.backend.accepted)
        video = self.backend.spec.modality == "video"
        with gr.Row():
            with gr.Column(scale=1):
                inputs = self._inputs(form, task)
            with gr.Column(scale=1):
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id=f"{task}-cancel")
                if video:
                    result = gr.Video(label="Result", elem_id=f"{task}-result", autoplay=True, loop=True,
                                      interactive=False)
                else:
                    result = gr.Image(label="Result", elem_id=f"{task}-result", type="filepath",
                                      interactive=False)
                with gr.Row():
                    seed_used = gr.Textbox(label="Seed used", elem_id=f"{task}-seed-used", interactive=False,
                                           buttons=["copy"], scale=3)
                    reuse = gr.Button("Reuse seed", elem_id=f"{task}-reuse-seed", scale=1)
                status = gr.Markdown(label="Status", elem_id=f"{task}-status")
        seed_input = inputs[[f.name for f in form].index("seed")] if any(f.name == "seed" for f in form) else None
        event = generate.click(self._handler(task, form), inputs=inputs, outputs=[result, seed_used, status],
                               api_name=f"generate_{task}", concurrency_limit=None)
        cancel.click(self._canceller(task), api_name=f"cancel_{task}")
        if seed_input is not None:
            reuse.click(lambda s: s, inputs=seed_used, outputs=seed_input, api_name=False)
        return event

    def _inputs(self, form: list[FormField], task: str) -> list:
        """The form's widgets in field order: prompts and images full width, the other inputs two
        to a row."""
        import gradio as gr

        widgets: dict[str, Any] = {}
        pending: list[FormField] = []

        def flush() -> None:
            for i in range(0, len(pending), 2):
                with gr.Row(equal_height=True):
                    for f in pending[i:i + 2]:
                        widgets[f.name] = self._widget(f, task)
            pending.clear()

        for f in form:
            if f.kind in ("image", "images") or (f.kind == "text" and f.multiline):
                flush()
                widgets[f.name] = self._widget(f, task)
            else:
                pending.append(f)
        flush()
        return [widgets[f.name] for f in form]

    @staticmethod
    def _widget(f: FormField, task: str):
        import gradio as gr

        common = {"label": f.label, "elem_id": f"{task}-{f.name}".replace("_", "-")}
        info = f.info + (f" {OFF}: off." if f.optional else "")
        if f.kind == "image":
            return gr.Image(type="pil", sources=["upload", "clipboard"], **common)
        if f.kind == "images":
            return gr.File(file_count="multiple", file_types=["image"], type="filepath", **common)
        common.update(info=info, interactive=not f.fixed)
        if f.kind == "text":
            return gr.Textbox(value=f.default, lines=3 if f.multiline else 1, max_length=f.maximum,
                              placeholder="what to generate" if f.name == "prompt" else None, **common)
        if f.kind == "choice":
            return gr.Dropdown(choices=list(f.choices), value=f.default, **common)
        if f.kind == "bool":
            return gr.Checkbox(value=bool(f.default), **common)
        if f.kind == "parsed":
            placeholder = f.placeholder
            if f.name == "lora":  # names of files in the LoRA folder (backends.py: never paths)
                placeholder = placeholder.replace("PATH", "NAME")
                common["info"] = f"{info} Here: file names in the LoRA folder (--lora-dir)."
            return gr.Textbox(value="", placeholder=placeholder, **common)
        if f.kind == "seed":
            common["info"] = f"{info} Empty (or {RANDOM_SEED}): a random seed, shown with the result."
            return gr.Textbox(value="", placeholder="random", **common)
        if f.kind == "int" and (f.maximum - f.minimum) / f.step <= SLIDER_MAX_POSITIONS:
            return gr.Slider(f.minimum, f.maximum, value=f.default, step=f.step, precision=0, **common)
        return gr.Number(value=f.default, minimum=f.minimum, maximum=f.maximum, step=f.step,
                         precision=0 if f.kind == "int" else None, **common)

    # -- handlers
    def _handler(self, task: str, form: list[FormField]):
        """The Generate handler of a tab: its parameters are the form's fields (their names show
        in the page's API), then the request and the progress tracker Gradio fills in."""
        import gradio as gr

        names = [f.name for f in form]

        def generate(*args: Any):
            *values, request, progress = args
            key = (getattr(request, "session_hash", None) or "", task)
            try:
                fields = request_values(form, _open_uploads(form, dict(zip(names, values))))
                progress(0, desc="queued")
                job = self.backend.start(fields)
            except ValueError as e:
                return None, "", f"**Not started:** {_one_paragraph(e)}"
            except Exception as e:  # noqa: BLE001 - a service that cannot be reached, ...
                return None, "", f"**Error:** {type(e).__name__}: {_one_paragraph(e)}"
            self.jobs[key] = job
            try:
                self._follow(job, progress)
            finally:
                if self.jobs.get(key) is job:
                    del self.jobs[key]
            return self._show(job.outcome)

        P = inspect.Parameter
        generate.__signature__ = inspect.Signature(
            [P(n, P.POSITIONAL_OR_KEYWORD) for n in names]
            + [P("request", P.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
               P("progress", P.POSITIONAL_OR_KEYWORD, default=gr.Progress())])
        generate.__annotations__ = {"request": gr.Request}  # Gradio fills parameters annotated so
        generate.__name__ = f"generate_{task}"
        return generate

    @staticmethod
    def _follow(job: Job, progress) -> None:
        """Wait for the job, moving the progress bar with its denoising steps."""
        while not job.wait(POLL_S):
            phase, step, total, fraction = job.progress()
            if phase == "denoising" and total:
                progress((step, total), desc="denoising", unit="steps")
            else:
                progress(fraction, desc=phase)

    def _show(self, outcome: Outcome):
        seed = "" if outcome.seed is None else str(outcome.seed)
        if outcome.status != "completed":
            return None, seed, f"**{outcome.status.capitalize()}**" + (
                f": {outcome.message}" if outcome.message and outcome.message != outcome.status else "")
        d = outcome.details
        parts = [f"{d['num_frames']} frames" if d.get("num_frames") and self.backend.spec.modality == "video" else "",
                 f"{d['width']}x{d['height']}" if d.get("width") else "",
                 f"{d['fps']} fps" if d.get("fps") and self.backend.spec.modality == "video" else "",
                 f"{d['steps']} steps" + (f" ({d['sampler']})" if d.get("sampler") else "") if d.get("steps") else "",
                 f"seed {seed}", outcome.message]
        note = " (random weights: noise)" if is_random_weights(self.backend.spec) else ""
        return outcome.path, seed, "**Done:** " + ", ".join(p for p in parts if p) + note

    def _canceller(self, task: str):
        import gradio as gr

        def cancel(request: gr.Request) -> None:
            job = self.jobs.get((getattr(request, "session_hash", None) or "", task))
            if job is not None:
                job.cancel()

        cancel.__annotations__ = {"request": gr.Request}  # a class, not this module's string annotation
        cancel.__name__ = f"cancel_{task}"
        return cancel

    # -- history (server mode)
    def _history_tab(self, blocks):
        import gradio as gr

        with gr.Row():
            refresh = gr.Button("Refresh", elem_id="history-refresh")
        table = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, elem_id="history-table",
                             wrap=True)
        with gr.Row():
            pick = gr.Dropdown(label="Completed job", choices=[], elem_id="history-job", scale=3)
            show = gr.Button("Show", elem_id="history-show", scale=1)
        with gr.Row():
            if self.backend.spec.modality == "video":
                media = gr.Video(label="Result", elem_id="history-result", interactive=False)
            else:
                media = gr.Image(label="Result", elem_id="history-result", type="filepath", interactive=False)
            with gr.Column():
                seed = gr.Textbox(label="Seed", elem_id="history-seed", interactive=False, buttons=["copy"])
                info = gr.Markdown(elem_id="history-info")
        outputs = [table, pick]
        refresh.click(self.history_rows, outputs=outputs, api_name="history")
        blocks.load(self.history_rows, outputs=outputs, api_name=False)
        show.click(self.history_show, inputs=pick, outputs=[media, seed, info], api_name="history_show")
        return outputs

    def history_rows(self):
        import gradio as gr

        try:
            jobs = self.backend.recent()
        except Exception as e:  # noqa: BLE001 - the service went away: say so in the table
            return [[f"({type(e).__name__}: {e})"] + [""] * (len(HISTORY_COLUMNS) - 1)], gr.update()
        rows = [[j["id"], j["status"], j.get("progress", ""), j.get("prompt", ""), j.get("size", ""),
                 j.get("num_frames", ""), str(j.get("seed", "")), _when(j.get("created_at"))] for j in jobs]
        done = [j["id"] for j in jobs if j["status"] == "completed"]
        return rows or [[""] * len(HISTORY_COLUMNS)], gr.update(choices=done, value=done[0] if done else None)

    def history_show(self, job_id: str | None):
        if not job_id:
            return None, "", "Pick a completed job."
        try:
            outcome = self.backend.result(job_id)
        except Exception as e:  # noqa: BLE001
            return None, "", f"**Error:** {e}"
        path, seed, text = self._show(outcome)
        return path, seed, text


def _open_uploads(form: list[FormField], values: dict[str, Any]) -> dict[str, Any]:
    """Uploaded files of "images" inputs (paths in Gradio's upload folder) -> PIL images."""
    from stages.request import load_image_file

    kinds = {f.name: f.kind for f in form}
    return {k: [load_image_file(p) for p in v] if kinds[k] == "images" and v else v for k, v in values.items()}


def _one_paragraph(error: BaseException) -> str:
    return "; ".join(line for line in str(error).splitlines() if line.strip())


def _when(timestamp: int | None) -> str:
    import time

    return "" if not timestamp else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def build_page(backend: Backend):
    """The Gradio Blocks of the page for `backend` (not launched)."""
    return Page(backend).build()


def launch(backend: Backend, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page: offline (no share link, no SSR, no analytics). Returns (blocks, url)."""
    _no_proxy_for_localhost()
    blocks = build_page(backend)
    blocks.queue(default_concurrency_limit=4)
    out_dir = str(getattr(backend, "out_dir", "")) or None
    blocks.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                  prevent_thread_lock=not block, allowed_paths=[out_dir] if out_dir else None,
                  footer_links=["api", "settings"], max_file_size="64mb", quiet=not block,
                  show_error=True)
    return blocks, blocks.local_url


# ----------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    from engine.options import EngineOptions, option_fields
    from lightx2v.arguments import option_arguments
    from lightx2v.cli import add_arguments, add_model_source_arguments

    p = argparse.ArgumentParser(prog="python -m lightx2v.web.ui",
                                description="The LightX2V page: a model in this process (--model) or a "
                                            "running `lightx2v serve` (--server).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="run this model in the page's process: a local checkpoint dir, registry name or "
                             "alias, or Hugging Face hub id (default tiny-wan, random weights)")
    source.add_argument("--server", metavar="URL", default=None,
                        help="send the jobs to a running `lightx2v serve` at URL (e.g. http://127.0.0.1:8000)")
    p.add_argument("--server-model", metavar="NAME", default=None,
                   help="which of the service's models the page runs (--server; default: the first video model)")
    p.add_argument("--api-key", default=None,
                   help=f"the service's API key (--server; default ${API_KEY_ENV}), sent as Authorization: Bearer")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host of the page (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=7860, help="HTTP port of the page")
    p.add_argument("--output-dir", default=None, help="where results are written (default: a new temp dir)")
    add_model_source_arguments(p)
    engine = p.add_argument_group("engine options (--model)")
    add_arguments(engine, option_arguments(option_fields(EngineOptions)))
    return p


def backend_from_args(args: argparse.Namespace) -> Backend:
    """The backend the flags ask for (loads the model for --model)."""
    from engine.options import EngineOptions, option_fields
    from lightx2v.arguments import option_arguments
    from lightx2v.cli import given

    flat = given(args, option_arguments(option_fields(EngineOptions)))
    if args.server:
        if flat or args.download or args.revision:
            given_here = ", ".join(sorted(flat)) or "download"
            raise ValueError(f"--server: the service runs the model; engine options ({given_here}) "
                             "are `lightx2v serve`'s flags")
        from lightx2v.web.backends import RemoteBackend

        return RemoteBackend(args.server, api_key=args.api_key, out_dir=args.output_dir, model=args.server_model)
    if args.api_key or args.server_model:
        raise ValueError("--api-key and --server-model are for --server")
    import dataclasses

    import torch

    from engine.options import default_dtype, options_from_flat
    from lightx2v.web.backends import load_local

    flat.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    flat.setdefault("dtype", default_dtype(flat["device"]))
    options = options_from_flat(EngineOptions, flat)
    keywords = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if f.name not in ("device", "dtype")}
    source = {"revision": args.revision} if args.revision is not None else {}
    return load_local(args.model or "tiny-wan", options.device, options.dtype, out_dir=args.output_dir,
                      download=args.download, **source, **keywords)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        backend = backend_from_args(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(backend, args.host, args.port, block=True)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
