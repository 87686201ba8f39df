"""Prompt templates of Visual Caption Boost (paper Sec. 2, App. A.1).

Each stage (BlendCap, VisualCap, HolisticCap) has an editable YAML file in
``datasets_scripts/prompts/`` holding the system prompt, a Jinja2 user-turn template and
the in-context examples. :class:`PromptTemplate` loads one, validates it (every example is
rendered once), turns template variables into OpenAI-style chat ``messages`` and gives the
SHA-256 of its canonical content, which every output record stores as provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common import not_found

__all__ = ["STAGES", "DEFAULT_PROMPTS_DIR", "SYSTEM_MODES", "PromptTemplate", "load_prompt", "load_prompts"]

STAGES = ("blendcap", "visualcap", "holisticcap")
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
SYSTEM_MODES = ("auto", "system", "merge")

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@dataclass
class PromptTemplate:
    """One stage's prompt: system prompt, user-turn template and in-context examples.

    Args:
        stage: "blendcap", "visualcap" or "holisticcap".
        system: the system prompt, or None.
        user_template: Jinja2 source of one user turn.
        examples: in-context examples; each holds the template variables and ``output``.
        source: the file it was read from (for error messages and manifests).
    """

    stage: str
    system: str | None
    user_template: str
    examples: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"{self.source}: unknown stage {self.stage!r}; expected one of {STAGES}")
        try:
            self._template = _ENV.from_string(self.user_template)
        except TemplateError as e:
            raise ValueError(f"{self.source}: user_template is not valid Jinja2: {e}") from e
        # the in-context turns are rendered once (this also validates every example)
        self._example_turns: list[dict[str, str]] = []
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, dict) or not isinstance(ex.get("output"), str):
                raise ValueError(f"{self.source}: example {i} needs the template variables and a string `output`")
            try:
                user = self.render_user(**{k: v for k, v in ex.items() if k != "output"})
            except (TemplateError, TypeError) as e:
                raise ValueError(f"{self.source}: example {i} does not render: {e}") from e
            self._example_turns += [{"role": "user", "content": user},
                                    {"role": "assistant", "content": ex["output"].strip()}]

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptTemplate":
        """Read a template YAML file (see ``datasets_scripts/prompts/README.md``)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read prompt template {path}: {e}") from e
        if not isinstance(data, dict) or "user_template" not in data or "stage" not in data:
            raise ValueError(f"prompt template {path} must be a mapping with `stage` and `user_template`")
        return cls(stage=data["stage"], system=data.get("system"), user_template=data["user_template"],
                   examples=list(data.get("examples") or []), source=str(path))

    def render_user(self, **variables: Any) -> str:
        """Render one user turn from the template variables (stripped)."""
        return self._template.render(**variables).strip()

    def messages(self, system_mode: str = "system", **variables: Any) -> list[dict[str, str]]:
        """OpenAI-style chat messages: [system] + (user, assistant) per example + [user].

        ``system_mode="merge"`` prepends the system prompt to the first user turn instead of
        sending a ``system`` message (for chat templates without a system role); "auto" is
        treated as "system" here (the transformers backend retries with "merge" on a template
        error).
        """
        if system_mode not in SYSTEM_MODES:
            raise ValueError(f"system_mode must be one of {SYSTEM_MODES}, got {system_mode!r}")
        turns = [dict(t) for t in self._example_turns] + [{"role": "user", "content": self.render_user(**variables)}]
        if not self.system:
            return turns
        if system_mode == "merge":
            turns[0] = {"role": "user", "content": f"{self.system.strip()}\n\n{turns[0]['content']}"}
            return turns
        return [{"role": "system", "content": self.system.strip()}] + turns

    def canonical(self) -> dict[str, Any]:
        """The content that defines the prompt (what the hash covers)."""
        return {"stage": self.stage, "system": self.system, "user_template": self.user_template,
                "examples": self.examples}

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`canonical` (layout and comments excluded)."""
        blob = json.dumps(self.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_prompt(stage: str, prompts_dir: str | Path | None = None) -> PromptTemplate:
    """Load ``<prompts_dir>/<stage>.yaml`` (default: the paper's prompts shipped with the repo)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    path = Path(prompts_dir or DEFAULT_PROMPTS_DIR) / f"{stage}.yaml"
    if not path.is_file():
        raise not_found("prompt template", path, f"copy datasets_scripts/prompts/{stage}.yaml there")
    tpl = PromptTemplate.from_file(path)
    if tpl.stage != stage:
        raise ValueError(f"{path} declares stage {tpl.stage!r}, expected {stage!r}")
    return tpl


def load_prompts(prompts_dir: str | Path | None = None) -> dict[str, PromptTemplate]:
    """All three stage templates from one folder."""
    return {s: load_prompt(s, prompts_dir) for s in STAGES}
