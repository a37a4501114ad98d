"""A HELM `Runner` whose executor sends every request of a run to flexgen at once.

HELM's executor calls its client once per request (a thread pool at most); an offloading
engine wants the opposite: all the requests of a run in one call, grouped into large blocks
that stream the weights once per block. `FlexGenRunner` swaps in `FlexGenExecutor`, which does
that for flexgen model deployments and leaves other deployments to HELM's usual path. Use it
from `helm-run --runner-class-name flexgen.helm.runner.FlexGenRunner`, or through `run_helm`
(what `python -m flexgen helm` calls).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from flexgen.errors import FlexGenError
from flexgen.helm import require_helm

require_helm()

from helm.benchmark.adaptation.scenario_state import ScenarioState  # noqa: E402
from helm.benchmark.executor import ExecutionSpec, Executor, ExecutorError  # noqa: E402
from helm.benchmark.runner import Runner  # noqa: E402
from helm.common.general import parallel_map  # noqa: E402
from helm.common.hierarchical_logger import hlog  # noqa: E402

from flexgen.helm import client as _client  # noqa: E402
from flexgen.helm.convert import generate  # noqa: E402


class FlexGenExecutor(Executor):
    """Runs the requests of a scenario state for a flexgen deployment as one batch job."""

    def __init__(self, execution_spec: ExecutionSpec, context=None, progress: bool = True):
        if context is None:
            super().__init__(execution_spec)
        else:  # share the runner's context (its tokenizer and metric services use it too)
            self.execution_spec = execution_spec
            self.context = context
        self.progress = progress

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        if self.execution_spec.dry_run:
            hlog("Skipped execution.")
            return scenario_state
        states = list(scenario_state.request_states)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(states):
            groups.setdefault(s.request.model_deployment, []).append(i)
        for deployment, idx in groups.items():
            if not _client.is_flexgen_deployment(deployment):
                done = parallel_map(self.process, [states[i] for i in idx],
                                    parallelism=self.execution_spec.parallelism)
                for i, s in zip(idx, done):
                    states[i] = s
                continue
            requests = [states[i].request for i in idx]
            hlog(f"flexgen: {len(requests)} requests for {deployment} in one batch job")
            with _client.engine_lock(deployment):
                llm = _client.engine_for(deployment)
                results = generate(llm, requests, max_sequence_length=_client.max_sequence_length(deployment),
                                   progress=self.progress)
            for i, result in zip(idx, results):
                if not result.success:
                    raise ExecutorError(f"{result.error} Request: {states[i].request}")
                states[i] = replace(states[i], result=result)
        hlog(f"Processed {len(states)} requests")
        return ScenarioState(adapter_spec=scenario_state.adapter_spec, request_states=states,
                             annotator_specs=scenario_state.annotator_specs)


class FlexGenRunner(Runner):
    """HELM's `Runner` with `FlexGenExecutor`: same scenarios, adapters, metrics and output files."""

    def __init__(self, execution_spec: ExecutionSpec, *args, **kwargs):
        if _client.offline():
            _client.no_nltk_downloads()
        super().__init__(execution_spec, *args, **kwargs)
        self.executor = FlexGenExecutor(execution_spec, context=self.executor.context)


def run_specs_for(descriptions: Sequence[str], model_name: str, max_eval_instances: int,
                  num_train_trials: Optional[int] = None) -> list:
    """HELM run specs for run-entry descriptions (e.g. "synthetic_reasoning:mode=pattern_match"), all
    evaluated on `model_name`."""
    from helm.benchmark.presentation.run_entry import RunEntry
    from helm.benchmark.run import run_entries_to_run_specs

    specs = []
    for d in descriptions:
        d = d.strip()
        if not d:
            raise FlexGenError("empty --description")
        if "model=" in d.replace(" ", "") or "model_deployment=" in d.replace(" ", ""):
            raise FlexGenError(f"--description {d!r} names a model; leave model= out: --model chooses it")
        sep = "" if d.endswith(":") else "," if ":" in d else ":"
        entry = f"{d}{sep}model={model_name}"
        try:
            try:
                specs += run_entries_to_run_specs([RunEntry(description=entry, priority=1, groups=None)],
                                                  max_eval_instances=max_eval_instances,
                                                  num_train_trials=num_train_trials)
            except ValueError as err:  # a run spec that names its own deployment (simple1): override it too
                if "model deployment" not in str(err):
                    raise
                specs += run_entries_to_run_specs(
                    [RunEntry(description=f"{entry},model_deployment={model_name}", priority=1, groups=None)],
                    max_eval_instances=max_eval_instances, num_train_trials=num_train_trials)
        except (ValueError, TypeError) as err:  # "Unknown run spec name: ...", an unknown argument, ...
            raise FlexGenError(f"HELM cannot build a run from {entry!r}: {err}") from None
    if not specs:
        raise FlexGenError("the descriptions gave no HELM runs")
    return specs


def run_helm(run_specs: Sequence, *, output_path: str, suite: str, local_path: str, progress: bool = True,
             skip_completed: bool = False) -> list[str]:
    """Run HELM run specs with `FlexGenRunner` and return their run directories.

    The flexgen model deployments the specs use must be registered (their configs read from
    `local_path`, or an engine given to `flexgen.helm.client.register_engine`).
    """
    from helm.benchmark.runner import set_benchmark_output_path
    from helm.common.authentication import Authentication

    set_benchmark_output_path(output_path)
    spec = ExecutionSpec(url=None, auth=Authentication(api_key=""), local_path=local_path, parallelism=1)
    runner = FlexGenRunner(spec, output_path, suite, skip_instances=False, cache_instances=False,
                           cache_instances_only=False, skip_completed_runs=skip_completed, exit_on_error=True)
    runner.executor.progress = progress
    runner.run_all(list(run_specs))
    return [runner._get_run_path(s) for s in run_specs]
