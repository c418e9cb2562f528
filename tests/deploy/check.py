#!/usr/bin/env python3
"""Static checks of the deployment files: Dockerfile, .dockerignore,
docker-compose.yml (+ deploy/), the Helm chart (helm/llm-quota/) and
docs/deployment.md.

There is no Docker engine and no helm binary where the tests run, so this
reads the files the way those tools would and checks what they rely on:

- Helm: Chart.yaml, values.yaml validated against values.schema.json (and the
  schema rejecting typos), every `.Values.…` path a template uses exists in
  values.yaml, every value is used, template blocks are balanced, every
  `include` names a `define`, hooks, probes, checksum annotation.
- Compose: every service has an image or a build, the replicas depend on the
  one-shot `migrate` service, Redis AOF, volumes, profiles, the load
  balancer's streaming settings, Prometheus targets.
- Dockerfile: stages, non-root user, HEALTHCHECK, ports, STOPSIGNAL, and that
  everything the binary embeds at compile time is in the build context.
- Every environment variable name given to the gateway (compose, Helm,
  Dockerfile) is one the gateway knows: the rows of the README's
  configuration table whose first cell is a backticked NAME.

Usage: python tests/deploy/check.py [--root REPO]
Prints one line per check and, last, `N passed, M failed`; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import traceback
from pathlib import Path

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover
    sys.exit(f"tests/deploy/check.py needs PyYAML and jsonschema: pip install -r tests/deploy/requirements.txt ({e})")


class CheckFailed(Exception):
    pass


CHECKS: list = []


def check(name):
    def deco(f):
        CHECKS.append((name, f))
        return f

    return deco


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def expect_none(problems, head):
    if problems:
        raise CheckFailed(head + ":\n" + "\n".join(f"      - {p}" for p in problems))


class Repo:
    """Lazily parsed files of the repository under test."""

    def __init__(self, root: Path):
        self.root = root
        self.chart_dir = root / "helm" / "llm-quota"
        self._cache = {}

    def path(self, rel) -> Path:
        return self.root / rel

    def text(self, rel) -> str:
        p = self.path(rel)
        expect(p.is_file(), f"{rel} is missing")
        return p.read_text(encoding="utf-8")

    def yaml(self, rel):
        if rel not in self._cache:
            try:
                self._cache[rel] = yaml.safe_load(self.text(rel))
            except yaml.YAMLError as e:
                raise CheckFailed(f"{rel} is not valid YAML: {e}")
        return self._cache[rel]

    def json(self, rel):
        if rel not in self._cache:
            try:
                self._cache[rel] = json.loads(self.text(rel))
            except json.JSONDecodeError as e:
                raise CheckFailed(f"{rel} is not valid JSON: {e}")
        return self._cache[rel]

    # --- the gateway's environment variables -------------------------------
    def known_env(self) -> set[str]:
        if "env" not in self._cache:
            names = set()
            for line in self.text("README.md").splitlines():
                m = re.match(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", line)
                if m:
                    names.add(m.group(1))
            self._cache["env"] = names
        return self._cache["env"]

    # --- Helm ---------------------------------------------------------------
    def chart(self, name):
        return f"helm/llm-quota/{name}"

    def templates(self) -> dict[str, str]:
        tdir = self.chart_dir / "templates"
        expect(tdir.is_dir(), "helm/llm-quota/templates/ is missing")
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(tdir.iterdir()) if p.is_file()}

    def values(self):
        v = self.yaml(self.chart("values.yaml"))
        expect(isinstance(v, dict), "helm/llm-quota/values.yaml must be a mapping")
        return v

    # --- compose ------------------------------------------------------------
    def compose(self):
        c = self.yaml("docker-compose.yml")
        expect(isinstance(c, dict) and isinstance(c.get("services"), dict), "docker-compose.yml has no services mapping")
        return c

    def services(self) -> dict:
        return self.compose()["services"]

    def gateway_services(self) -> dict:
        """Services running this repository's image: built from it, or
        using the same image name as such a service."""
        svcs = self.services()
        built_images = {s.get("image") for s in svcs.values() if isinstance(s, dict) and is_local_build(s)}
        return {
            n: s
            for n, s in svcs.items()
            if isinstance(s, dict) and (is_local_build(s) or (s.get("image") and s.get("image") in built_images))
        }

    def replicas(self) -> dict:
        return {n: s for n, s in self.gateway_services().items() if n != "migrate"}

    # --- Dockerfile ---------------------------------------------------------
    def dockerfile(self) -> list[tuple[str, str]]:
        """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
        if "dockerfile" not in self._cache:
            out, buf = [], ""
            for raw in self.text("Dockerfile").splitlines():
                line = raw.strip()
                if line.startswith("#") or (not line and not buf):
                    continue
                if line.endswith("\\"):
                    buf += line[:-1] + " "
                    continue
                buf += line
                if buf.strip():
                    word, _, rest = buf.strip().partition(" ")
                    out.append((word.upper(), rest.strip()))
                buf = ""
            self._cache["dockerfile"] = out
        return self._cache["dockerfile"]

    def final_stage(self) -> list[tuple[str, str]]:
        ins = self.dockerfile()
        starts = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
        expect(starts, "Dockerfile has no FROM")
        return ins[starts[-1]:]


def is_local_build(svc) -> bool:
    b = svc.get("build")
    if isinstance(b, str):
        return b in (".", "./")
    if isinstance(b, dict):
        return b.get("context", ".") in (".", "./")
    return False


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?err} / ${VAR}, with defaults and
    without an environment: what a fresh checkout with a .env would use."""

    def sub(m):
        body = m.group(1)
        mm = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?$", body, re.S)
        if not mm:
            return m.group(0)
        var, op, arg = mm.groups()
        if op in (":-", "-"):
            return interpolate(arg)
        return f"<{var}>"

    return re.sub(r"\$\{([^{}]*)\}", sub, str(value))


def compose_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def env_mapping(svc) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            k, _, v = str(item).partition("=")
            out[k] = v
        return out
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def parse_duration(s) -> float:
    """Compose (1m30s) and gateway (250ms, 5s, 2m, 1h, bare seconds) durations."""
    s = str(s).strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", s):
        return float(s)
    total, pos = 0.0, 0
    for m in re.finditer(r"([0-9]+(?:\.[0-9]+)?)(ms|us|h|m|s)", s):
        expect(m.start() == pos, f"cannot parse duration {s!r}")
        n, unit = float(m.group(1)), m.group(2)
        total += n * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
        pos = m.end()
    expect(pos == len(s) and pos > 0, f"cannot parse duration {s!r}")
    return total


# --- Helm template scanning -------------------------------------------------

ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def actions(text: str) -> list[str]:
    """The actions of a Go template, comments dropped."""
    return [a for a in ACTION.findall(text) if not a.startswith("/*")]


def values_paths(text: str) -> set[str]:
    paths = set()
    for a in actions(text):
        for m in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", a):
            paths.add(m.group(1)[1:])
    return paths


def lookup(values, dotted: str):
    node = values
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            return False, ".".join(dotted.split(".")[: i + 1])
        node = node[part]
    return True, None


# ============================================================================
# README
# ============================================================================


@check("README configuration table lists the gateway's variables")
def _(r: Repo):
    names = r.known_env()
    expect(len(names) >= 10, f"found only {sorted(names)} in README.md's configuration table")
    for n in ("ADMIN_PASSWORD", "DATABASE_URL", "REDIS_URL", "SHUTDOWN_GRACE"):
        expect(n in names, f"{n} is not a row of README.md's configuration table")


# ============================================================================
# Helm chart
# ============================================================================


@check("helm: Chart.yaml")
def _(r: Repo):
    c = r.yaml(r.chart("Chart.yaml"))
    expect(isinstance(c, dict), "Chart.yaml must be a mapping")
    expect(c.get("apiVersion") == "v2", f"apiVersion must be v2 (Helm 3), is {c.get('apiVersion')!r}")
    expect(c.get("name") == "llm-quota", f"name must be llm-quota (the folder's name), is {c.get('name')!r}")
    expect(c.get("type", "application") == "application", "type must be application")
    semver = r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
    expect(re.match(semver, str(c.get("version", ""))), f"version {c.get('version')!r} is not SemVer 2")
    cargo = r.text("Cargo.toml")
    m = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', cargo, re.M | re.S)
    expect(m, "no [package] version in Cargo.toml")
    expect(
        str(c.get("appVersion")) == m.group(1),
        f"appVersion {c.get('appVersion')!r} differs from Cargo.toml's version {m.group(1)!r} (it is the default image tag)",
    )


@check("helm: values.schema.json is a valid draft-07 schema")
def _(r: Repo):
    s = r.json(r.chart("values.schema.json"))
    try:
        jsonschema.Draft7Validator.check_schema(s)
    except jsonschema.SchemaError as e:
        raise CheckFailed(f"values.schema.json: {e.message} at {'/'.join(map(str, e.path))}")
    expect(s.get("additionalProperties") is False, "values.schema.json must set additionalProperties: false at the top, so a mistyped value fails `helm install`")


def schema_errors(schema, values) -> list[str]:
    v = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in sorted(v.iter_errors(values), key=lambda e: list(map(str, e.absolute_path)))]


@check("helm: values.yaml validates against values.schema.json")
def _(r: Repo):
    expect_none(schema_errors(r.json(r.chart("values.schema.json")), r.values()), "values.yaml does not match values.schema.json")


@check("helm: the schema rejects mistyped and invalid values")
def _(r: Repo):
    schema, base = r.json(r.chart("values.schema.json")), r.values()
    cases = {
        "a mistyped top-level key (replicaCont)": lambda v: v.__setitem__("replicaCont", 3),
        "a mistyped nested key (shutdown.graceSecond)": lambda v: v["shutdown"].__setitem__("graceSecond", 10),
        "an unknown gateway variable (config.REDIS_PREFX)": lambda v: v["config"].__setitem__("REDIS_PREFX", "x"),
        "a malformed duration (config.FLUSH_INTERVAL=5 parsecs)": lambda v: v["config"].__setitem__("FLUSH_INTERVAL", "5 parsecs"),
        "a SQLite DATABASE_URL (secrets.databaseUrl)": lambda v: v["secrets"].__setitem__("databaseUrl", "sqlite:///data/x.db"),
        "a string replica count": lambda v: v.__setitem__("replicaCount", "2"),
    }
    accepted = []
    for what, mutate in cases.items():
        v = copy.deepcopy(base)
        mutate(v)
        if not schema_errors(schema, v):
            accepted.append(what)
    expect_none(accepted, "values.schema.json accepts")


@check("helm: the schema's config keys and values.yaml's config keys are gateway variables")
def _(r: Repo):
    known = r.known_env()
    schema = r.json(r.chart("values.schema.json"))
    in_schema = set(schema["properties"]["config"].get("properties", {}))
    in_values = set((r.values().get("config") or {}).keys())
    problems = [f"schema config.{k}: not in README.md's configuration table" for k in sorted(in_schema - known)]
    problems += [f"values.yaml config.{k}: not in README.md's configuration table" for k in sorted(in_values - known)]
    chart_managed = {"PROXY_HOST", "PROXY_PORT", "ADMIN_HOST", "ADMIN_PORT", "METRICS_PORT", "SHUTDOWN_GRACE", "MIGRATE_ON_START"}
    secret = {"ADMIN_PASSWORD", "DATABASE_URL", "REDIS_URL", "SESSION_SECRET"}
    problems += [f"schema config.{k}: set by the chart itself (or a secret); must not be in config" for k in sorted(in_schema & (chart_managed | secret))]
    missing = known - in_schema - chart_managed - secret
    problems += [f"{k}: a gateway variable neither in the schema's config nor set by the chart" for k in sorted(missing)]
    expect_none(problems, "config keys")


@check("helm: every template file is there")
def _(r: Repo):
    t = r.templates()
    want = [
        "_helpers.tpl", "NOTES.txt", "deployment.yaml", "services.yaml", "configmap.yaml", "secret.yaml",
        "migration-job.yaml", "hpa.yaml", "pdb.yaml", "servicemonitor.yaml", "ingress.yaml",
    ]
    expect_none([f"templates/{w} is missing" for w in want if w not in t], "chart templates")


@check("helm: every .Values path a template uses exists in values.yaml")
def _(r: Repo):
    values, problems = r.values(), []
    for name, text in r.templates().items():
        for p in sorted(values_paths(text)):
            ok, first_missing = lookup(values, p)
            if not ok:
                problems.append(f"templates/{name}: .Values.{p} (values.yaml has no {first_missing})")
    expect_none(problems, "undefined values")


@check("helm: every top-level value is used by a template")
def _(r: Repo):
    used = {p.split(".")[0] for text in r.templates().values() for p in values_paths(text)}
    unused = sorted(set(r.values()) - used)
    expect_none([f"{k}: in values.yaml but no template reads .Values.{k}" for k in unused], "dead values")


@check("helm: template blocks are balanced")
def _(r: Repo):
    problems = []
    for name, text in r.templates().items():
        if text.count("{{") != text.count("}}"):
            problems.append(f"templates/{name}: {text.count('{{')} '{{{{' but {text.count('}}')} '}}}}'")
            continue
        stack = []
        for a in actions(text):
            word = re.match(r"^([a-z]+)\b", a)
            word = word.group(1) if word else ""
            if word in ("if", "range", "with", "define", "block"):
                stack.append(word)
            elif word == "end":
                if not stack:
                    problems.append(f"templates/{name}: {{{{ end }}}} without an open block")
                else:
                    stack.pop()
            elif word == "else" and not stack:
                problems.append(f"templates/{name}: {{{{ else }}}} outside a block")
        if stack:
            problems.append(f"templates/{name}: unclosed {', '.join(stack)}")
    expect_none(problems, "unbalanced templates")


@check("helm: every include names a defined template, and .Chart fields exist")
def _(r: Repo):
    tmpl = r.templates()
    defined = {m for text in tmpl.values() for m in re.findall(r'\{\{-?\s*define\s+"([^"]+)"', text)}
    chart = r.yaml(r.chart("Chart.yaml"))
    problems = []
    for name, text in tmpl.items():
        for a in actions(text):
            for inc in re.findall(r'\b(?:include|template)\s+"([^"]+)"', a):
                if inc not in defined:
                    problems.append(f"templates/{name}: include {inc!r} is not defined")
            for field in re.findall(r"\.Chart\.([A-Za-z]+)", a):
                key = field[0].lower() + field[1:]
                if key not in chart:
                    problems.append(f"templates/{name}: .Chart.{field} (Chart.yaml has no {key})")
        for m in re.findall(r'print \$\.Template\.BasePath "/([^"]+)"', text):
            if m not in tmpl:
                problems.append(f"templates/{name}: checksum over templates/{m}, which does not exist")
    expect_none(problems, "template references")


@check("helm: gateway variable names in templates are ones the gateway knows")
def _(r: Repo):
    known, problems = r.known_env(), []
    for name, text in r.templates().items():
        found = set(re.findall(r"^\s*-\s*name:\s*([A-Z][A-Z0-9_]*)\s*$", text, re.M))
        if name == "configmap.yaml":
            found |= set(re.findall(r"^\s+([A-Z][A-Z0-9_]*):", text, re.M))
        if name == "secret.yaml":
            found |= set(re.findall(r"^\s+([A-Z][A-Z0-9_]*):", text, re.M))
        problems += [f"templates/{name}: {n}" for n in sorted(found - known)]
    keys = r.values().get("existingSecretKeys") or {}
    problems += [f"values.yaml existingSecretKeys.{k}: default key {v!r}" for k, v in keys.items() if v and v not in known]
    expect_none(problems, "not in README.md's configuration table")


@check("helm: Deployment probes, checksum, graceful shutdown, security")
def _(r: Repo):
    d, v = r.templates()["deployment.yaml"], r.values()
    problems = []
    need = {
        "checksum/config annotation": r"checksum/config:.*configmap\.yaml.*sha256sum",
        "livenessProbe": r"livenessProbe:\s*\n\s*httpGet:\s*\n\s*path: \{\{ \.Values\.probes\.liveness\.path \}\}",
        "readinessProbe": r"readinessProbe:\s*\n\s*httpGet:\s*\n\s*path: \{\{ \.Values\.probes\.readiness\.path \}\}",
        "terminationGracePeriodSeconds": r"terminationGracePeriodSeconds:",
        "preStop hook": r"preStop:",
        "ConfigMap envFrom": r"configMapRef:",
        "secret env": r'include "llm-quota\.secretEnv"',
        "replicas unless autoscaled": r"if not \.Values\.autoscaling\.enabled \}\}\s*\n\s*replicas:",
    }
    problems += [f"deployment.yaml: no {what}" for what, rx in need.items() if not re.search(rx, d)]
    if v["probes"]["liveness"]["path"] != "/healthz":
        problems.append("probes.liveness.path should default to /healthz")
    if v["probes"]["readiness"]["path"] != "/readyz":
        problems.append("probes.readiness.path should default to /readyz")
    sc, psc = v.get("securityContext", {}), v.get("podSecurityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser", 0) == 0:
        problems.append("podSecurityContext must run as a non-root user")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append("securityContext.readOnlyRootFilesystem should be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("securityContext.allowPrivilegeEscalation should be false")
    sd = v["shutdown"]
    if sd["graceSeconds"] < 30:
        problems.append("shutdown.graceSeconds below 30 cuts long streams short")
    helpers = r.templates()["_helpers.tpl"]
    if not re.search(r"add \.Values\.shutdown\.preStopSleepSeconds \.Values\.shutdown\.graceSeconds \.Values\.shutdown\.flushSeconds", helpers):
        problems.append("terminationGracePeriodSeconds must be preStop + SHUTDOWN_GRACE + flush")
    if "SHUTDOWN_GRACE: {{ printf \"%ds\" (int .Values.shutdown.graceSeconds)" not in r.templates()["configmap.yaml"]:
        problems.append("configmap.yaml must set SHUTDOWN_GRACE from shutdown.graceSeconds")
    expect_none(problems, "Deployment")


@check("helm: preStop uses the image's busybox")
def _(r: Repo):
    path = r.values()["image"]["busyboxPath"]
    copies = [a for w, a in r.final_stage() if w == "COPY"]
    expect(any(a.split()[-1] == path for a in copies), f"image.busyboxPath {path} is not copied into the Dockerfile's runtime stage")


@check("helm: migration hook job runs `llm-quota migrate` before install and upgrade")
def _(r: Repo):
    j = r.templates()["migration-job.yaml"]
    problems = []
    if not re.search(r"kind: Job", j):
        problems.append("no Job")
    hooks = re.findall(r"helm\.sh/hook:\s*(\S+)", j)
    if not hooks or any(set(h.split(",")) != {"pre-install", "pre-upgrade"} for h in hooks):
        problems.append(f"helm.sh/hook must be pre-install,pre-upgrade (found {hooks})")
    weights = [int(w) for w in re.findall(r'helm\.sh/hook-weight:\s*"(-?[0-9]+)"', j)]
    if len(weights) != 2 or weights[0] >= weights[1]:
        problems.append(f"the hook Secret must come before the Job (weights {weights})")
    if 'args: ["migrate"]' not in j:
        problems.append('the Job must run args: ["migrate"]')
    if re.search(r"configMapRef|envFrom", j):
        problems.append("a pre-install hook cannot read the release's ConfigMap (it does not exist yet)")
    if "restartPolicy: Never" not in j:
        problems.append("restartPolicy: Never (the Job's backoffLimit retries)")
    expect_none(problems, "migration-job.yaml")


@check("helm: Services, HPA, PDB, ServiceMonitor, Ingress")
def _(r: Repo):
    t, v = r.templates(), r.values()
    problems = []
    svc = t["services.yaml"]
    for port in ("proxy", "admin", "metrics"):
        if not re.search(rf"targetPort: {port}\b", svc):
            problems.append(f"services.yaml: no Service for the {port} port")
    if "kind: HorizontalPodAutoscaler" not in t["hpa.yaml"] or "autoscaling/v2" not in t["hpa.yaml"]:
        problems.append("hpa.yaml: an autoscaling/v2 HorizontalPodAutoscaler")
    if "kind: PodDisruptionBudget" not in t["pdb.yaml"] or "policy/v1" not in t["pdb.yaml"]:
        problems.append("pdb.yaml: a policy/v1 PodDisruptionBudget")
    if "kind: ServiceMonitor" not in t["servicemonitor.yaml"] or "if .Values.metrics.serviceMonitor.enabled" not in t["servicemonitor.yaml"]:
        problems.append("servicemonitor.yaml: an optional ServiceMonitor")
    if "if .Values.ingress.enabled" not in t["ingress.yaml"]:
        problems.append("ingress.yaml: an optional Ingress")
    ann = v["ingress"].get("annotations") or {}
    if ann.get("nginx.ingress.kubernetes.io/proxy-buffering") != "off":
        problems.append("ingress.annotations: nginx.ingress.kubernetes.io/proxy-buffering must be \"off\" for streaming")
    if int(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout", "0")) < 3600:
        problems.append("ingress.annotations: proxy-read-timeout below 3600 cuts long streams")
    if v["podDisruptionBudget"].get("maxUnavailable") in (0, "0", "0%"):
        problems.append("podDisruptionBudget.maxUnavailable 0 blocks every node drain")
    expect_none(problems, "chart resources")


# ============================================================================
# docker-compose.yml and deploy/
# ============================================================================


@check("compose: every service has an image or a build")
def _(r: Repo):
    problems = [f"{n}: neither image nor build" for n, s in r.services().items() if not (isinstance(s, dict) and (s.get("image") or s.get("build")))]
    expect_none(problems, "services")
    for n in ("migrate", "llm-quota-1", "llm-quota-2", "redis", "postgres", "ollama", "prometheus"):
        expect(n in r.services(), f"docker-compose.yml has no {n} service")
    expect(set(r.replicas()) == {"llm-quota-1", "llm-quota-2"}, f"gateway replicas built from this repo: {sorted(r.replicas())}, want llm-quota-1 and llm-quota-2")
    expect("migrate" in r.gateway_services(), "the migrate service must run this repository's image")


@check("compose: replicas depend on migrate (completed), Redis and PostgreSQL (healthy)")
def _(r: Repo):
    problems = []
    for n, s in r.replicas().items():
        deps = s.get("depends_on") or {}
        if not isinstance(deps, dict):
            problems.append(f"{n}: depends_on must be a mapping with conditions")
            continue
        want = {"migrate": "service_completed_successfully", "redis": "service_healthy", "postgres": "service_healthy"}
        for dep, cond in want.items():
            got = (deps.get(dep) or {}).get("condition")
            if got != cond:
                problems.append(f"{n}: depends_on.{dep}.condition is {got!r}, want {cond}")
    m = r.services()["migrate"]
    if m.get("command") not in (["migrate"], "migrate"):
        problems.append(f"migrate: command must be [\"migrate\"] (llm-quota migrate), is {m.get('command')!r}")
    if str(m.get("restart", "no")) not in ("no", "False", "false"):
        problems.append("migrate: a one-shot service must not restart")
    expect_none(problems, "dependencies")


@check("compose: depends_on targets exist and have the health checks they wait for")
def _(r: Repo):
    svcs, problems = r.services(), []
    image_has_healthcheck = any(w == "HEALTHCHECK" and not a.upper().startswith("NONE") for w, a in r.final_stage())
    gateways = r.gateway_services()
    for n, s in svcs.items():
        deps = s.get("depends_on") or {}
        items = deps.items() if isinstance(deps, dict) else [(d, {}) for d in deps]
        for dep, spec in items:
            if dep not in svcs:
                problems.append(f"{n}: depends on unknown service {dep}")
                continue
            if (spec or {}).get("condition") == "service_healthy":
                hc = svcs[dep].get("healthcheck")
                has = (hc and not hc.get("disable")) or (hc is None and dep in gateways and image_has_healthcheck)
                if not has:
                    problems.append(f"{n}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if svcs[dep].get("profiles") and not s.get("profiles"):
                problems.append(f"{n}: depends on {dep}, which only runs with a profile")
    expect_none(problems, "depends_on")


@check("compose: gateway environment variables are ones the gateway knows")
def _(r: Repo):
    known, problems = r.known_env(), []
    for n, s in r.gateway_services().items():
        problems += [f"{n}: {k}" for k in sorted(set(env_mapping(s)) - known)]
        if s.get("env_file"):
            problems.append(f"{n}: env_file hides the names from this check; use environment:")
    expect_none(problems, "not in README.md's configuration table")


@check("compose: cluster mode settings shared by every replica")
def _(r: Repo):
    problems = []
    envs = {n: env_mapping(s) for n, s in r.replicas().items()}
    for n, e in envs.items():
        if not e.get("ADMIN_PASSWORD", "").startswith("${ADMIN_PASSWORD:?"):
            problems.append(f"{n}: ADMIN_PASSWORD must be required from .env: ${{ADMIN_PASSWORD:?…}}")
        if not interpolate(e.get("REDIS_URL", "")).startswith("redis://"):
            problems.append(f"{n}: REDIS_URL must be a redis:// URL (cluster mode)")
        if not re.match(r"^postgres(ql)?://", interpolate(e.get("DATABASE_URL", ""))):
            problems.append(f"{n}: DATABASE_URL must be a postgres:// URL (cluster mode)")
        if e.get("MIGRATE_ON_START", "").lower() not in ("false", "0", "no", "off"):
            problems.append(f"{n}: MIGRATE_ON_START must be false (the migrate service runs the migrations)")
        if interpolate(e.get("ADMIN_HOST", "127.0.0.1")) == "127.0.0.1":
            problems.append(f"{n}: ADMIN_HOST 127.0.0.1 is unreachable from the load balancer")
    for var in ("ADMIN_PASSWORD", "DATABASE_URL", "REDIS_URL", "REDIS_PREFIX", "APP_TZ"):
        if len({e.get(var) for e in envs.values()}) != 1:
            problems.append(f"{var} differs between replicas")
    m = env_mapping(r.services()["migrate"])
    if m.get("DATABASE_URL") != next(iter(envs.values())).get("DATABASE_URL"):
        problems.append("migrate: DATABASE_URL differs from the replicas'")
    expect_none(problems, "cluster settings")


@check("compose: stop_grace_period outlasts SHUTDOWN_GRACE")
def _(r: Repo):
    problems = []
    for n, s in r.replicas().items():
        grace = parse_duration(interpolate(env_mapping(s).get("SHUTDOWN_GRACE", "30s")))
        stop = parse_duration(s.get("stop_grace_period", "10s"))
        if stop < grace + 5:
            problems.append(f"{n}: stop_grace_period {stop:g}s must exceed SHUTDOWN_GRACE {grace:g}s by at least 5s (final flush)")
    expect_none(problems, "shutdown")


@check("compose: Redis with AOF and a volume, PostgreSQL with a volume and a health check")
def _(r: Repo):
    svcs, problems = r.services(), []
    redis = svcs["redis"]
    cmd = redis.get("command")
    cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd or "")
    if not re.search(r"--appendonly\s+yes", cmd):
        problems.append("redis: command must enable AOF (--appendonly yes)")
    if not any(str(v).split(":")[1:2] == ["/data"] for v in redis.get("volumes") or []):
        problems.append("redis: no volume on /data (the AOF would be lost with the container)")
    if "noeviction" not in cmd and "maxmemory-policy" in cmd:
        problems.append("redis: maxmemory-policy must stay noeviction")
    pg = svcs["postgres"]
    if not any(str(v).split(":")[1:2] == ["/var/lib/postgresql/data"] for v in pg.get("volumes") or []):
        problems.append("postgres: no volume on /var/lib/postgresql/data")
    if not pg.get("healthcheck"):
        problems.append("postgres: no healthcheck")
    if not redis.get("healthcheck"):
        problems.append("redis: no healthcheck")
    expect_none(problems, "stores")


@check("compose: volumes are declared and bind mounts exist")
def _(r: Repo):
    c, problems = r.compose(), []
    declared = set((c.get("volumes") or {}).keys())
    for n, s in r.services().items():
        for v in s.get("volumes") or []:
            src = v.get("source") if isinstance(v, dict) else str(v).split(":")[0]
            if src.startswith((".", "/")):
                if not (r.root / src).exists():
                    problems.append(f"{n}: bind mount {src} does not exist")
            elif src not in declared:
                problems.append(f"{n}: named volume {src} is not declared under volumes:")
    expect_none(problems, "volumes")


@check("compose: optional profiles ollama and monitoring")
def _(r: Repo):
    svcs, problems = r.services(), []
    if svcs["ollama"].get("profiles") != ["ollama"]:
        problems.append("ollama: profiles must be [ollama]")
    if svcs["prometheus"].get("profiles") != ["monitoring"]:
        problems.append("prometheus: profiles must be [monitoring]")
    for n in list(r.gateway_services()) + ["redis", "postgres"]:
        if svcs[n].get("profiles"):
            problems.append(f"{n}: must run without a profile")
    expect_none(problems, "profiles")


@check("compose: Prometheus scrapes every replica's metrics port")
def _(r: Repo):
    prom = r.services()["prometheus"]
    mounts = [str(v).split(":") for v in prom.get("volumes") or []]
    cfg = [m[0] for m in mounts if len(m) > 1 and m[1] == "/etc/prometheus/prometheus.yml"]
    expect(cfg, "prometheus: deploy/prometheus.yml is not mounted at /etc/prometheus/prometheus.yml")
    p = r.yaml(str(Path(cfg[0]).as_posix()).lstrip("./") if cfg[0].startswith("./") else cfg[0])
    targets = {t for job in p.get("scrape_configs") or [] for sc in job.get("static_configs") or [] for t in sc.get("targets") or []}
    problems = []
    for n, s in r.replicas().items():
        port = interpolate(env_mapping(s).get("METRICS_PORT", "9100"))
        if f"{n}:{port}" not in targets:
            problems.append(f"no target {n}:{port} in {cfg[0]}")
    expect_none(problems, "scrape targets")


def lb_config(r: Repo):
    lb = [
        (n, s) for n, s in r.services().items()
        if any(str(v).split(":")[1:2] and str(v).split(":")[1].startswith("/etc/nginx/") for v in s.get("volumes") or [])
    ]
    expect(len(lb) == 1, f"expected one nginx load balancer service with its config mounted under /etc/nginx/, found {[n for n, _ in lb]}")
    name, svc = lb[0]
    src = [str(v).split(":")[0] for v in svc["volumes"] if str(v).split(":")[1].startswith("/etc/nginx/")][0]
    return name, svc, src, r.text(src[2:] if src.startswith("./") else src)


def nginx_blocks(conf: str, kind: str) -> dict[str, str]:
    """name -> body of every `kind name {…}` block (no nested braces needed)."""
    conf = re.sub(r"#[^\n]*", "", conf)
    out = {}
    for m in re.finditer(rf"\b{kind}\s+([^\s{{]*)\s*\{{", conf):
        depth, i = 1, m.end()
        while depth and i < len(conf):
            depth += {"{": 1, "}": -1}.get(conf[i], 0)
            i += 1
        out[m.group(1) or f"#{len(out)}"] = conf[m.end(): i - 1]
    return out


@check("compose: load balancer streams (no buffering, no cache, HTTP/1.1, long read timeout)")
def _(r: Repo):
    name, svc, src, conf = lb_config(r)
    problems = []
    servers = nginx_blocks(conf, "server")
    expect(servers, f"{src}: no server blocks")
    for sname, body in servers.items():
        listen = re.search(r"\blisten\s+(\S+);", body)
        where = f"{src} server listening on {listen.group(1) if listen else '?'}"
        for loc, lbody in nginx_blocks(body, "location").items():
            if "proxy_pass" not in lbody:
                continue
            for directive in ("proxy_buffering off;", "proxy_cache off;", "proxy_http_version 1.1;"):
                if not re.search(r"\b" + re.escape(directive).replace(r"\ ", r"\s+"), lbody):
                    problems.append(f"{where}, location {loc}: missing `{directive}`")
            t = re.search(r"\bproxy_read_timeout\s+(\S+);", lbody)
            if listen and listen.group(1).endswith("8000") and (not t or parse_duration(t.group(1)) < 3600):
                problems.append(f"{where}, location {loc}: proxy_read_timeout must be at least 3600s for long streams")
    if re.search(r"\bproxy_buffering\s+on\b", conf):
        problems.append(f"{src}: proxy_buffering on")
    expect_none(problems, "streaming")


@check("compose: load balancer balances both replicas; admin published on 127.0.0.1 only")
def _(r: Repo):
    name, svc, src, conf = lb_config(r)
    ups = nginx_blocks(conf, "upstream")
    problems = []
    for port_var, default in (("PROXY_PORT", "8000"), ("ADMIN_PORT", "8001")):
        for n, s in r.replicas().items():
            port = interpolate(env_mapping(s).get(port_var, default))
            if not any(re.search(rf"\bserver\s+{re.escape(n)}:{port}\b", b) for b in ups.values()):
                problems.append(f"{src}: no upstream server {n}:{port} ({port_var})")
    published = [interpolate(p) for p in svc.get("ports") or []]
    for p in published:
        parts = str(p).split(":")
        if parts[-1] == "8001" and (len(parts) < 3 or parts[0] != "127.0.0.1"):
            problems.append(f"{name}: admin port published as {p!r}; bind it to 127.0.0.1")
    if not any(str(p).split(":")[-1] == "8000" for p in published):
        problems.append(f"{name}: the proxy port 8000 is not published")
    for n, s in r.gateway_services().items():
        if s.get("ports"):
            problems.append(f"{n}: publishes ports itself; clients go through {name}")
    expect_none(problems, "load balancer")


@check("compose: every ${VAR} is documented in deploy/env.example")
def _(r: Repo):
    used = compose_vars(r.text("docker-compose.yml"))
    example = r.text("deploy/env.example")
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    expect_none(sorted(f"${{{v}}}" for v in used - documented), "used in docker-compose.yml but not in deploy/env.example")


# ============================================================================
# Dockerfile and .dockerignore
# ============================================================================


def dockerignore_patterns(r: Repo):
    pats = []
    for line in r.text(".dockerignore").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        p = line[1:] if neg else line
        p = p.strip("/")
        rx = ""
        i = 0
        while i < len(p):
            if p.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif p.startswith("**", i):
                rx += ".*"
                i += 2
            elif p[i] == "*":
                rx += "[^/]*"
                i += 1
            elif p[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(p[i])
                i += 1
        pats.append((neg, re.compile(rx + r"$")))
    return pats


def dockerignored(pats, rel: str) -> bool:
    """Docker's rule: a path is out if it or a parent folder matches the
    last matching pattern (later `!` patterns bring it back)."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in pats:
        if any(rx.match(c) for c in candidates):
            excluded = not neg
    return excluded


@check("docker: multi-stage build, locked release build, small non-root runtime")
def _(r: Repo):
    ins = r.dockerfile()
    froms = [a for w, a in ins if w == "FROM"]
    problems = []
    if len(froms) < 2:
        problems.append("a multi-stage build needs a builder and a runtime stage")
    runs = " ".join(a for w, a in ins if w == "RUN")
    if not re.search(r"cargo build --release --locked", runs):
        problems.append("no `cargo build --release --locked`")
    final = r.final_stage()
    base = final[0][1].split()[0]
    if re.match(r"^rust:", base):
        problems.append(f"the runtime stage is based on {base} (a full toolchain)")
    users = [a for w, a in final if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the runtime stage must end with a non-root USER")
    expect_none(problems, "Dockerfile")


@check("docker: HEALTHCHECK, EXPOSE 8000 8001 9100, STOPSIGNAL SIGTERM, /data volume")
def _(r: Repo):
    final, problems = r.final_stage(), []
    hc = [a for w, a in final if w == "HEALTHCHECK"]
    if not hc or "/healthz" not in hc[-1]:
        problems.append("no HEALTHCHECK of /healthz in the runtime stage")
    elif "busybox" in hc[-1]:
        path = re.search(r"(/\S*busybox)", hc[-1]).group(1)
        if not any(w == "COPY" and a.split()[-1] == path for w, a in final):
            problems.append(f"the HEALTHCHECK uses {path}, which the runtime stage does not copy in")
    exposed = {p.split("/")[0] for w, a in final if w == "EXPOSE" for p in a.split()}
    for port in ("8000", "8001", "9100"):
        if port not in exposed:
            problems.append(f"port {port} is not EXPOSEd")
    sig = [a for w, a in final if w == "STOPSIGNAL"]
    if sig != ["SIGTERM"]:
        problems.append(f"STOPSIGNAL must be SIGTERM (the gateway drains on it), is {sig}")
    if not any(w == "VOLUME" and "/data" in a for w, a in final):
        problems.append("no VOLUME /data for embedded mode")
    env = dockerfile_env(r)
    if not env.get("DATABASE_URL", "").startswith("sqlite:///data/"):
        problems.append(f"DATABASE_URL should default to a SQLite file in /data, is {env.get('DATABASE_URL')!r}")
    entry = [a for w, a in final if w == "ENTRYPOINT"]
    if not entry or "llm-quota" not in entry[-1]:
        problems.append("ENTRYPOINT must be the llm-quota binary (so `docker run IMAGE migrate` works)")
    else:
        binary = json.loads(entry[-1])[0]
        if not any(w == "COPY" and a.split()[-1] == binary for w, a in final):
            problems.append(f"ENTRYPOINT {binary} is not copied into the runtime stage")
    expect_none(problems, "runtime stage")


def dockerfile_env(r: Repo) -> dict:
    env = {}
    for w, a in r.final_stage():
        if w == "ENV":
            for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)", a):
                env[m.group(1)] = m.group(2).strip('"')
    return env


@check("docker: ENV names are ones the gateway knows")
def _(r: Repo):
    unknown = sorted(set(dockerfile_env(r)) - r.known_env())
    expect_none(unknown, "Dockerfile ENV not in README.md's configuration table")


@check("docker: .dockerignore keeps local state out and compile-time inputs in")
def _(r: Repo):
    pats = dockerignore_patterns(r)
    problems = []
    for out in ("target", ".venv", "data", "logs", "tests/artefacts", "bench/results", ".git"):
        if not dockerignored(pats, out):
            problems.append(f"{out} is sent to the build context")
    needed = {"Cargo.toml", "Cargo.lock", "bench/Cargo.toml", "src/main.rs", "src/lib.rs"}
    # Everything the binary embeds at compile time (include_str!, include_bytes!, sqlx::migrate!).
    for rs in (r.root / "src").rglob("*.rs"):
        text = rs.read_text(encoding="utf-8")
        for m in re.finditer(r'include_(?:str|bytes)!\((?:concat!\()?"([^"]+)"', text):
            needed.add((rs.parent / m.group(1)).resolve().relative_to(r.root.resolve()).as_posix())
        for m in re.finditer(r'migrate!\("([^"]+)"\)', text):
            needed.add(m.group(1))
        for m in re.finditer(r'concat!\("([^"]+/)",\s*\$', text):
            needed.add((rs.parent / m.group(1)).resolve().relative_to(r.root.resolve()).as_posix())
    for n in sorted(needed):
        if not (r.root / n).exists():
            problems.append(f"{n}: embedded at compile time but missing")
        elif dockerignored(pats, n):
            problems.append(f"{n}: embedded at compile time but excluded by .dockerignore")
    copies = [a for w, a in r.dockerfile() if w == "COPY" and "--from" not in a]
    if not any(a.split()[0] == "." for a in copies):
        for n in sorted(needed):
            top = n.split("/")[0]
            if not any(top in a.split()[:-1] or n in a.split()[:-1] for a in copies):
                problems.append(f"{n}: not copied into the builder")
    expect_none(problems, "build context")


# ============================================================================
# docs
# ============================================================================


@check("docs: docs/deployment.md covers compose, Helm and outages; its links resolve")
def _(r: Repo):
    doc = r.text("docs/deployment.md")
    problems = []
    for must in ("docker compose", "--profile ollama", "--profile monitoring", "helm install", "existingSecret",
                 "llm-quota migrate", "USAGE_RETENTION_DAYS", "QUOTA_FAILURE_MODE", "appendonly"):
        if must not in doc:
            problems.append(f"does not mention {must!r}")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        if not (r.root / "docs" / target).resolve().exists():
            problems.append(f"link to {target} does not resolve")
    known = r.known_env()
    compose_only = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", r.text("deploy/env.example"), re.M))
    for name in sorted(set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`", doc))):
        if name not in known and name not in compose_only and name not in {"RUST_LOG"}:
            problems.append(f"`{name}` is neither a gateway variable nor in deploy/env.example")
    expect_none(problems, "docs/deployment.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2], help="repository root")
    args = ap.parse_args()
    repo = Repo(args.root.resolve())
    passed = failed = 0
    for name, f in CHECKS:
        try:
            f(repo)
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {name}\n    {e}")
            continue
        except Exception:  # a bug here, or a file so broken the check could not run
            failed += 1
            print(f"FAIL {name}\n    the check crashed:\n" + "".join("      " + l for l in traceback.format_exc().splitlines(True)))
            continue
        passed += 1
        print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
