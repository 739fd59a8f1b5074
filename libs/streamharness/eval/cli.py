"""``streamharness eval …``: the entry points a Kubernetes Job runs (eval-jobs/job.yaml)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

app = typer.Typer(help="Streaming-Eval: replay episodes, score them on time, report.", no_args_is_help=True)

# Options of `run` and `score`: an LLM judge for free-text answers (see _answer_matcher).
_JUDGE_URL = typer.Option(None, envvar="SH_EVAL_JUDGE_URL",
                          help="OpenAI-compatible API base (…/v1) of an LLM judge for free-text answers, instead of MiniLM.")
_JUDGE_MODEL = typer.Option(None, envvar="SH_EVAL_JUDGE_MODEL", help="Model the LLM judge asks (needed with --judge-url).")
_JUDGE_API_KEY = typer.Option(None, envvar="SH_EVAL_JUDGE_API_KEY", help="Bearer key for the LLM judge's endpoint.")


@app.command()
def run(
    episodes: Path = typer.Option(..., exists=True, help="Episode file (.json/.jsonl) or folder of them."),
    gateway: str = typer.Option(None, envvar="SH_EVAL_GATEWAY", help="Gateway host:port of a deployed pipeline."),
    baseline: str = typer.Option(None, help="Instead of a pipeline: silent, always, every-k, first-choice or random-choice."),
    k: int = typer.Option(5, min=1, help="k of the every-k baseline (seconds)."),
    seed: int = typer.Option(0, min=0, help="Seed of the random-choice baseline."),
    local: bool = typer.Option(False, help="Start the whole pipeline locally for the run (streamharness up's stack)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the services' code in this process without Kafka "
                                    "(encoder on Triton at SH_TRITON_URL; generation per SH_GENERATION_*)."),
    start_triton: bool = typer.Option(False, help="With --in-process: start a local tritonserver on the dev model "
                                      "repository for the run instead of using SH_TRITON_URL."),
    send_fps: float = typer.Option(2.0, min=0.1, max=30.0, help="Frames per media second sent into the pipeline "
                                   "(ingest keeps SH_INGEST's decision rate of them)."),
    speed: float = typer.Option(0.0, min=0.0, help="Replay speed on media time (1 = real time, 0 = as fast as it goes)."),
    concurrency: int = typer.Option(2, min=1, max=64, help="Episodes replayed at once."),
    system: str = typer.Option("pipeline", help="Name of the system under test in the result."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="MiniLM similarity for a free-text answer to match."),
    judge_url: str = _JUDGE_URL,
    judge_model: str = _JUDGE_MODEL,
    judge_api_key: str = _JUDGE_API_KEY,
    api_key: str = typer.Option(None, envvar="SH_CLIENT_API_KEY", help="Tenant API key for the gateway."),
    out: Path = typer.Option(Path("eval-result.json"), help="JSON result."),
    runs_out: Path = typer.Option(None, help="Also save the raw responses (JSONL of runs)."),
    report: Path = typer.Option(None, help="Self-contained HTML report."),
) -> None:
    """Replay episodes through a pipeline (or a baseline) and score them."""
    from rich.console import Console
    from rich.progress import Progress

    from streamharness.eval.episode import load_episodes, save_runs
    from streamharness.eval.runner import BASELINES, run_baseline, run_many_via_gateway
    from streamharness.eval.scoring import save_result

    matcher = _answer_matcher(threshold, judge_url, judge_model, judge_api_key)  # bad judge options fail before replaying
    console = Console()
    eps = load_episodes(episodes)
    if not eps:
        raise typer.BadParameter(f"no episodes in {episodes} (.json / .jsonl files, searched recursively)")
    base_dir = episodes if episodes.is_dir() else episodes.parent
    if sum(bool(x) for x in (gateway, baseline, local, in_process)) != 1:
        raise typer.BadParameter("give exactly one of --gateway, --baseline, --local or --in-process")
    if start_triton and not in_process:
        raise typer.BadParameter("--start-triton goes with --in-process")
    if baseline:
        if baseline not in BASELINES:
            raise typer.BadParameter(f"--baseline must be one of {', '.join(BASELINES)}")
        runs = [run_baseline(ep, baseline, k=k, seed=seed) for ep in eps]
        system = runs[0].system if runs else f"baseline:{baseline}"
    elif in_process:
        runs = _run_in_process(eps, base_dir, system=system, start_triton=start_triton, send_fps=send_fps, console=console)
    else:
        stack = None
        if local:
            from streamharness.devinfra.stack import LocalStack

            with console.status("starting the local pipeline…"):
                stack = LocalStack().start()
            gateway = stack.gateway_addresses[0]
        try:
            with Progress(console=console) as progress:
                task = progress.add_task(f"replaying {len(eps)} episodes", total=len(eps))
                runs = asyncio.run(run_many_via_gateway(
                    gateway, eps, concurrency=concurrency, speed=speed, system=system, base_dir=base_dir, send_fps=send_fps,
                    api_key=api_key, progress=lambda _ep: progress.advance(task)))
        finally:
            if stack is not None:
                stack.stop()
    if runs_out:
        save_runs(runs, runs_out)
    score = _score(eps, runs, matcher, system)
    save_result(score, out)
    console.print(f"{system}: SW-F1 {_fmt(score.total.sw_f1)} (TP {score.total.tp}, FP {score.total.fp}, FN {score.total.fn}) → {out}")
    if report:
        from streamharness.eval.report import write_report

        write_report(report, score)
        console.print(f"report → {report}")


@app.command()
def compare(
    baseline: Path = typer.Argument(..., exists=True, help="Result JSON of the reference system."),
    candidate: Path = typer.Argument(..., exists=True, help="Result JSON of the system under test."),
    tolerance: float = typer.Option(0.02, min=0.0, help="SW-F1 drop that counts as a regression."),
    episodes: Path = typer.Option(None, exists=True, help="Episode file (.json/.jsonl) or folder the results were run "
                                  "on: also print the first-choice and random-choice chance baselines on them."),
    seed: int = typer.Option(0, min=0, help="Seed of the random-choice baseline (with --episodes)."),
    report: Path = typer.Option(None, help="Write an HTML report of the candidate with the comparison."),
) -> None:
    """Regression table of two results; exits 1 when the candidate regressed. With --episodes, a
    second table sets both beside the chance baselines (it does not change the exit code)."""
    from rich.console import Console
    from rich.table import Table

    from streamharness.eval.scoring import compare as compare_scores
    from streamharness.eval.scoring import has_regression, load_result

    a, b = load_result(baseline), load_result(candidate)
    rows = compare_scores(a, b, tolerance=tolerance)
    table = Table(title=f"{a.system} → {b.system}")
    for col in ("scope", "metric", "baseline", "candidate", "delta", ""):
        table.add_column(col)
    for r in rows:
        table.add_row(r.scope, r.metric, _fmt(r.a), _fmt(r.b), _fmt(r.delta), "[red]regression[/]" if r.regression else "")
    console = Console()
    console.print(table)
    if episodes is not None:
        _chance_table(console, episodes, a, b, seed)
    if report:
        from streamharness.eval.report import write_report

        write_report(report, b, baseline=a)
    raise typer.Exit(1 if has_regression(rows) else 0)


@app.command()
def score(
    episodes: Path = typer.Option(..., exists=True, help="Episode file (.json/.jsonl) or folder of them."),
    runs: Path = typer.Option(..., exists=True, dir_okay=False, help="Saved runs: the JSONL that `eval run --runs-out` writes."),
    system: str = typer.Option(None, help="Name of the system in the result (default: the runs' own)."),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="MiniLM similarity for a free-text answer to match."),
    judge_url: str = _JUDGE_URL,
    judge_model: str = _JUDGE_MODEL,
    judge_api_key: str = _JUDGE_API_KEY,
    out: Path = typer.Option(Path("eval-result.json"), help="JSON result."),
    report: Path = typer.Option(None, help="Self-contained HTML report."),
) -> None:
    """Score saved runs again without replaying (another threshold, or an LLM judge)."""
    from rich.console import Console

    from streamharness.eval.episode import EpisodeFormatError, load_episodes, load_runs
    from streamharness.eval.scoring import save_result

    matcher = _answer_matcher(threshold, judge_url, judge_model, judge_api_key)
    try:
        eps, saved = load_episodes(episodes), load_runs(runs)
    except EpisodeFormatError as err:
        raise typer.BadParameter(str(err)) from None
    result = _score(eps, saved, matcher, system)
    save_result(result, out)
    console = Console()
    console.print(f"{result.system}: SW-F1 {_fmt(result.total.sw_f1)} (TP {result.total.tp}, FP {result.total.fp}, "
                  f"FN {result.total.fn}; {result.matcher}) → {out}")
    if report:
        from streamharness.eval.report import write_report

        write_report(report, result)
        console.print(f"report → {report}")


@app.command("build-episodes")
def build_episodes(
    out: Path = typer.Option(None, help="Where to write the set; default: the cache dir's episodes/ (SH_DEV_CACHE_DIR)."),
    short_duration_s: int = typer.Option(600, min=0, help="Length of the short synthetic episode (0 = none)."),
    long_duration_s: int = typer.Option(7200, min=0, help="Length of the multi-hour synthetic episode (0 = none)."),
    seed: int = typer.Option(0, help="Seed of the synthetic episodes."),
) -> None:
    """Write the shipped episode set, ready to run: the hand-annotated opencv-doc episodes with their
    videos resolved, and the synthetic ones rendered (frames beside each episode file)."""
    from streamharness.eval.episodes_builtin import build_builtin_set

    for path in build_builtin_set(out, short_duration_s=short_duration_s, long_duration_s=long_duration_s, seed=seed):
        typer.echo(path)


def _run_in_process(eps, base_dir: Path, *, system: str, start_triton: bool, send_fps: float, console) -> list:
    """Episodes one after another through :class:`~streamharness.inprocess.InProcessPipeline`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from streamharness.eval.runner import run_episode_in_process
    from streamharness.inprocess import InProcessConfig, InProcessPipeline
    from streamharness.settings import TritonSettings, load_settings

    triton_server = None
    triton = load_settings(TritonSettings)
    if start_triton:
        from streamharness.devinfra.triton_server import TritonServer

        with console.status("starting tritonserver…"):
            triton_server = TritonServer().start()
        triton = triton.model_copy(update={"url": triton_server.grpc_url})
    pipeline = InProcessPipeline(InProcessConfig(triton=triton))
    try:
        with console.status("loading the pipeline's models…"):
            pipeline.open()
        if not pipeline.ready():
            raise typer.BadParameter(f"the in-process pipeline is not ready: is Triton serving the frame encoder at {triton.url}?")
        runs = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("media s"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            for ep in eps:
                total = int(ep.duration_s)
                task = progress.add_task(ep.episode_id, total=total)
                runs.append(run_episode_in_process(
                    pipeline, ep, send_fps=send_fps, system=system, base_dir=base_dir,
                    on_frame=lambda ts, task=task, total=total: progress.update(task, completed=min(ts // 1000, total))))
                progress.update(task, completed=total)
        return runs
    finally:
        pipeline.close()
        if triton_server is not None:
            triton_server.stop()


def _chance_table(console, episodes: Path, a, b, seed: int) -> None:
    """SW-F1 of both results beside first-choice and random-choice on the same episodes, overall and
    per cell with events; a cell where the candidate does not beat the better chance baseline is marked."""
    from rich.table import Table

    from streamharness.eval.episode import MODES, POSITIONS, EpisodeFormatError, load_episodes
    from streamharness.eval.runner import run_baseline
    from streamharness.eval.scoring import AnswerMatcher, score_run

    try:
        eps = load_episodes(episodes)
    except EpisodeFormatError as err:
        raise typer.BadParameter(str(err), param_hint="'--episodes'") from None
    if not eps:
        raise typer.BadParameter(f"no episodes in {episodes} (.json / .jsonl files, searched recursively)",
                                 param_hint="'--episodes'")
    matcher = AnswerMatcher()  # the chance baselines answer choices only: no text encoder is loaded
    chance = {}
    for policy in ("first-choice", "random-choice"):
        runs = [run_baseline(ep, policy, seed=seed) for ep in eps]
        chance[policy] = score_run(eps, runs, matcher, system=runs[0].system)
    first, rand = chance["first-choice"], chance["random-choice"]
    ids = {ep.episode_id for ep in eps}
    for result in (a, b):
        if {s.episode_id for s in result.episodes} != ids:
            console.print(f"[yellow]warning:[/] {result.system} was not scored on the episodes in {episodes}; "
                          "the chance baselines are not comparable with it")

    table = Table(title=f"chance baselines ({len(eps)} episode{'s' if len(eps) != 1 else ''}, random-choice seed {seed})")
    table.add_column("scope", no_wrap=True)
    for col in ("baseline", "candidate", "first-\nchoice", "random-\nchoice", ""):
        table.add_column(col, no_wrap=True)
    scopes = [("overall", a.total, b.total, first.total, rand.total)]
    scopes += [(f"{m}/{p}", a.cell(m, p), b.cell(m, p), first.cell(m, p), rand.cell(m, p))
               for m in MODES for p in POSITIONS if first.cell(m, p).events]
    for scope, ca, cb, cf, cr in scopes:
        floor = max((v for v in (cf.sw_f1, cr.sw_f1) if v is not None), default=None)
        beaten = cb.sw_f1 is not None and (floor is None or cb.sw_f1 > floor + 1e-12)
        table.add_row(scope, _fmt(ca.sw_f1), _fmt(cb.sw_f1), _fmt(cf.sw_f1), _fmt(cr.sw_f1),
                      "" if beaten else "[yellow]≤ chance[/]")
    console.print(table)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _answer_matcher(threshold: float, judge_url: str | None, judge_model: str | None, judge_api_key: str | None):
    """How `run` and `score` match answers: free text by the LLM judge when --judge-url is given,
    else by MiniLM at ``threshold``; choices always by letter or text."""
    from streamharness.eval.scoring import AnswerMatcher, MiniLMMatcher, OpenAICompatibleJudge

    if judge_url and not judge_model:
        raise typer.BadParameter("--judge-url needs the model to ask: --judge-model (or SH_EVAL_JUDGE_MODEL)",
                                 param_hint="'--judge-model'")
    if judge_model and not judge_url:
        raise typer.BadParameter("--judge-model needs the judge's endpoint: --judge-url (or SH_EVAL_JUDGE_URL)",
                                 param_hint="'--judge-url'")
    if not judge_url:
        return AnswerMatcher(MiniLMMatcher(threshold=threshold))
    if not judge_url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{judge_url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080/openai/v1)",
                                 param_hint="'--judge-url'")
    return AnswerMatcher(OpenAICompatibleJudge(judge_url, judge_model, judge_api_key))


def _score(episodes, runs, matcher, system: str | None):
    """score_run, with a judge that gives no verdict (or runs that fit no episode) as one clear error line."""
    from streamharness.eval.scoring import JudgeError, score_run

    try:
        return score_run(episodes, runs, matcher, system=system)
    except (JudgeError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
