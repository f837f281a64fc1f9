#!/usr/bin/env python3
"""Validation of the deployment and observability files (run by lint.sh).

Each check prints one line, `PASS name: ...` or `FAIL name: ...` followed by
its errors; the exit status is 1 when any check failed.

  metrics      the metric list below against the Rust sources
  dockerfile   stages, entrypoints, ports, user, cache mounts, .dockerignore
  compose      services, healthchecks, loopback-only ports, depends_on,
               mounted files, environment against the services' settings
  nats         sync_interval: always wherever a NATS server is configured
  prometheus   prometheus.yml (rule files, scrape targets)
  alerts       rule structure, PromQL syntax, metric and label names
  grafana      dashboard JSON (panels, targets, PromQL, metric and label
               names) and provisioning files
  k8s:<dir>    kustomize render (render_kustomize.py), kubernetes-validate
               against Kubernetes KUBERNETES_VERSION (strict schemas), CRD
               objects checked for structure, and the deployment policy
               (probes, resources, security context, drain, secrets, ...)

Every metric name used in a dashboard or an alert must be in METRICS (a
renamed metric fails the lint), and every entry of METRICS must still be
emitted by the services' sources.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render_kustomize  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
INFRA = os.path.join(ROOT, "infra")
KUBERNETES_VERSION = os.environ.get("KUBERNETES_VERSION", "1.30.0")

# name -> (type, labels). Histograms also expose name_bucket{le}, name_sum, name_count.
METRICS: dict[str, tuple[str, set[str]]] = {
    "http_requests_total": ("counter", {"method", "route", "status"}),
    "http_request_duration_seconds": ("histogram", {"method", "route", "status"}),
    "core_ledger_commands_total": ("counter", {"result"}),
    "ledger_batch_size": ("histogram", set()),
    "ledger_batch_duration_seconds": ("histogram", set()),
    "ledger_batch_failures_total": ("counter", set()),
    "ledger_lock_isolations_total": ("counter", set()),
    "db_transaction_retries_total": ("counter", set()),
    "core_fences_total": ("counter", set()),
    "outbox_backlog": ("gauge", {"service"}),
    "outbox_oldest_age_seconds": ("gauge", {"service"}),
    "outbox_relay_read_duration_seconds": ("histogram", {"service"}),
    "outbox_published_total": ("counter", {"service"}),
    "outbox_relay_errors_total": ("counter", {"service"}),
    "transfer_requests_total": ("counter", {"result"}),
    "transfer_resolutions_total": ("counter", {"status"}),
    "pending_transfers": ("gauge", set()),
    "pending_transfers_oldest_age_seconds": ("gauge", set()),
    "reconciler_actions_total": ("counter", {"action"}),
    "reconciler_errors_total": ("counter", set()),
    "core_call_duration_seconds": ("histogram", {"op", "outcome"}),
    "history_sync_applied_total": ("counter", set()),
    "projector_events_applied_total": ("counter", set()),
    "projector_duplicates_total": ("counter", set()),
    "projector_gaps_filled_total": ("counter", set()),
    "projector_gap_entries_filled_total": ("counter", set()),
    "projector_retries_total": ("counter", set()),
    "projector_dead_letters_total": ("counter", {"stream", "kind"}),
    "projector_dead_letter_publish_failures_total": ("counter", set()),
    "projector_dead_letters_replayed_total": ("counter", set()),
    "projector_lag_seconds": ("histogram", set()),
    "projector_consumer_pending": ("gauge", {"feed"}),
    "projector_consumer_ack_pending": ("gauge", {"feed"}),
    "projector_database_unavailable": ("gauge", {"feed"}),
    "projector_database_pauses_total": ("counter", {"feed"}),
    "projector_conflicting_events_total": ("counter", set()),
    "projector_interest_events_not_the_cores_total": ("counter", set()),
    "projector_tax_records_recovered_total": ("counter", set()),
    "projector_tax_sweep_errors_total": ("counter", set()),
    "projector_tax_sweep_given_up_total": ("counter", set()),
    "projector_tax_sweep_passes_total": ("counter", set()),
    "projector_tax_record_conflicts_total": ("counter", set()),
    "projector_tax_sweep_scanned_total": ("counter", set()),
    "projector_tax_sweep_retrying": ("gauge", set()),
    "history_repairs_total": ("counter", set()),
    "projector_audit_repairs_total": ("counter", set()),
    "projector_audit_errors_total": ("counter", set()),
    "projector_batch_size": ("histogram", {"feed"}),
    "projector_tax_records_total": ("counter", set()),
    "interest_cache_hits_total": ("counter", set()),
    "interest_cache_misses_total": ("counter", set()),
    "interest_cache_fallbacks_total": ("counter", set()),
    "interest_payouts_total": ("counter", set()),
    "interest_shadow_mismatches_total": ("counter", set()),
    "interest_shadow_errors_total": ("counter", set()),
    "interest_shadow_skipped_total": ("counter", set()),
}
SCRAPE_LABELS = {"job", "instance"}
# Series Prometheus makes itself.
SYNTHETIC_SERIES = {"up": set()}

REQUIRED_ALERTS = {
    "ProjectorLagHigh", "OutboxBacklogOld", "DeadLettersGrowing", "InterestShadowMismatch",
    "PendingTransfersStuck", "ReconcilerErrors", "RelayPublishErrors", "ServiceDown",
    "InterestCacheFallbacks", "HighHttp5xx",
}

# The three services: port, HTTP address setting, settings source, database URL setting.
SERVICES = {
    "core-bank": {"port": 8081, "addr": "CORE_HTTP_ADDR", "db": "CORE_DATABASE_URL", "database": "bank_core",
                  "required": {"CORE_API_TOKEN", "CORE_DATABASE_URL", "NATS_URL", "REDIS_URL"}},
    "transfer": {"port": 8080, "addr": "TRANSFER_HTTP_ADDR", "db": "CHANNEL_DATABASE_URL", "database": "bank_channel",
                 "required": {"CORE_API_TOKEN", "AUTH_JWT_SECRET", "CHANNEL_DATABASE_URL", "NATS_URL", "CORE_URL"}},
    "projector": {"port": 8082, "addr": "PROJECTOR_HTTP_ADDR", "db": "CHANNEL_DATABASE_URL", "database": "bank_channel",
                  "required": {"CORE_API_TOKEN", "CHANNEL_DATABASE_URL", "NATS_URL", "CORE_URL"}},
}

# Settings that are not in the ConfigMap bank-config: secrets (from Secrets,
# key by key) and the drain delay (on each Deployment).
NOT_IN_CONFIGMAP = {
    "CORE_API_TOKEN", "CORE_READ_API_TOKEN", "AUTH_JWT_SECRET", "PROJECTOR_API_TOKEN", "CORE_DATABASE_URL",
    "CHANNEL_DATABASE_URL", "SHUTDOWN_DRAIN_DELAY_MS",
}

# Groups of custom resources whose schemas are not in kubernetes-validate.
CRD_GROUPS = {"postgresql.cnpg.io"}

failed = False


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def report(name: str, fn: Callable[[list[str]], str]) -> None:
    """Runs one check; fn appends errors and returns a short summary."""
    global failed
    errors: list[str] = []
    try:
        summary = fn(errors)
    except Exception as e:  # a crash of a check is a failure of that check
        summary = ""
        errors.append(f"{type(e).__name__}: {e}")
    if errors:
        failed = True
        print(f"FAIL {name}: {len(errors)} problem(s)")
        for e in errors:
            print(f"       - {e}")
    else:
        print(f"PASS {name}: {summary}")
    sys.stdout.flush()


def load_yaml(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------
# Settings of the services, read from their clap definitions.

ENV_RE = re.compile(r'env\s*=\s*"([A-Z][A-Z0-9_]*)"')


FLATTEN_RE = re.compile(r"#\[command\(flatten\)\]\s*pub\s+\w+\s*:\s*(\w+)")


def struct_bodies() -> dict[str, str]:
    """The body of every `pub struct Name { ... }` in the crates' sources."""
    out = {}
    for crate in ("common", *SERVICES):
        for dirpath, _, files in os.walk(os.path.join(ROOT, crate, "src")):
            for name in files:
                if name.endswith(".rs"):
                    text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    for m in re.finditer(r"^pub struct (\w+) \{\n(.*?)^\}", text, re.S | re.M):
                        out.setdefault(m.group(1), m.group(2))
    return out


def settings_of(src: str, structs: dict[str, str], seen: set[str]) -> set[str]:
    """Env names declared in `src` and in the argument groups it flattens,
    wherever those are defined (e.g. a group shared by two services)."""
    names = set(ENV_RE.findall(src))
    for ty in FLATTEN_RE.findall(src):
        if ty in structs and ty not in seen:
            seen.add(ty)
            names |= settings_of(structs[ty], structs, seen)
    return names


def service_settings() -> dict[str, set[str]]:
    common = set(ENV_RE.findall(open(os.path.join(ROOT, "common/src/config.rs"), encoding="utf-8").read()))
    structs = struct_bodies()
    out = {}
    for svc in SERVICES:
        src = open(os.path.join(ROOT, svc, "src/config.rs"), encoding="utf-8").read()
        out[svc] = common | settings_of(src, structs, set())
    return out


SETTINGS = service_settings()
ALL_SETTINGS = set().union(*SETTINGS.values())


# --------------------------------------------------------------------------
# PromQL

def series_labels(name: str) -> set[str] | None:
    """Labels of a series name, or None when the name is unknown."""
    if name in SYNTHETIC_SERIES:
        return SYNTHETIC_SERIES[name] | SCRAPE_LABELS
    if name in METRICS:
        kind, labels = METRICS[name]
        return None if kind == "histogram" else labels | SCRAPE_LABELS
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and base in METRICS and METRICS[base][0] == "histogram":
            extra = {"le"} if suffix == "_bucket" else set()
            return METRICS[base][1] | SCRAPE_LABELS | extra
    return None


GRAFANA_VARS = [
    (re.compile(r"\$__rate_interval|\$\{__rate_interval\}"), "1m"),
    (re.compile(r"\$__interval|\$\{__interval\}"), "1m"),
    (re.compile(r"\$__range|\$\{__range\}"), "1h"),
    (re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?"), "x"),
]


def check_promql(expr: str, where: str, errors: list[str], grafana: bool = False) -> set[str]:
    """Parses expr, checks metric and label names; returns the labels of the
    series it selects (for legend/annotation template checks)."""
    import promql_parser as pp

    text = expr
    if grafana:
        for rx, repl in GRAFANA_VARS:
            text = rx.sub(repl, text)
    try:
        ast = pp.parse(text)
    except Exception as e:
        errors.append(f"{where}: PromQL does not parse: {e}: {expr!r}")
        return set()

    seen_labels: set[str] = set()

    def selector(vs: Any) -> set[str]:
        name = vs.name
        matchers = list(vs.matchers.matchers) if vs.matchers is not None else []
        for m in matchers:
            if m.name == "__name__":
                name = m.value
        if not name:
            errors.append(f"{where}: selector without a metric name")
            return set()
        labels = series_labels(name)
        if labels is None:
            errors.append(f"{where}: unknown metric {name!r} (not in infra/lint/check_infra.py METRICS)")
            return set()
        for m in matchers:
            if m.name != "__name__" and m.name not in labels:
                errors.append(f"{where}: metric {name} has no label {m.name!r} (labels: {sorted(labels)})")
        return labels

    def walk(node: Any) -> set[str]:
        """Returns the union of labels of the series under node."""
        if isinstance(node, pp.VectorSelector):
            return selector(node)
        if isinstance(node, pp.MatrixSelector):
            return selector(node.vector_selector)
        if isinstance(node, pp.AggregateExpr):
            inner = walk(node.expr)
            if node.param is not None:
                walk(node.param)
            mod = node.modifier
            if mod is not None and str(mod.type).endswith("By"):
                for lab in mod.labels:
                    if lab not in inner:
                        errors.append(f"{where}: aggregation by {lab!r}, which none of its series has (they have {sorted(inner)})")
                return set(mod.labels)
            if mod is not None:  # without (...)
                return inner - set(mod.labels)
            return set()
        if isinstance(node, pp.BinaryExpr):
            return walk(node.lhs) | walk(node.rhs)
        if isinstance(node, pp.Call):
            out: set[str] = set()
            for a in node.args:
                out |= walk(a)
            return out
        if isinstance(node, (pp.ParenExpr, pp.SubqueryExpr, pp.UnaryExpr)):
            return walk(node.expr)
        return set()

    seen_labels = walk(ast)
    return seen_labels


# --------------------------------------------------------------------------
# Checks

def check_metrics(errors: list[str]) -> str:
    """METRICS must match what the services emit."""
    rx = re.compile(r'metrics::(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
    found: dict[str, str] = {}
    for d in ("common", "core-bank", "transfer", "projector"):
        for base, _, files in os.walk(os.path.join(ROOT, d, "src")):
            for f in files:
                if f.endswith(".rs"):
                    for kind, name in rx.findall(open(os.path.join(base, f), encoding="utf-8").read()):
                        found[name] = kind
    if not found:
        errors.append("no metrics::counter!/gauge!/histogram! call found in the sources")
    for name, (kind, _) in METRICS.items():
        if name not in found:
            errors.append(f"metric {name} is listed in check_infra.py but no longer emitted by the services (renamed?)")
        elif found[name] != kind:
            errors.append(f"metric {name} is a {found[name]} in the sources, listed as a {kind}")
    extra = sorted(set(found) - set(METRICS))
    note = f"; not used by dashboards/alerts list: {', '.join(extra)}" if extra else ""
    return f"{len(METRICS)} metric names match the sources{note}"


def dockerfile_stages(path: str) -> dict[str, dict[str, Any]]:
    stages: dict[str, dict[str, Any]] = {}
    current = None
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            if not m:
                continue
            current = (m.group(2) or f"stage{len(stages)}").lower()
            stages[current] = {"from": m.group(1), "lines": []}
        elif current:
            stages[current]["lines"].append((instr, rest.strip()))
    return stages


def check_dockerfile(errors: list[str]) -> str:
    path = os.path.join(ROOT, "Dockerfile")
    stages = dockerfile_stages(path)
    b = stages.get("builder")
    if not b or not b["from"].startswith("rust:"):
        errors.append("stage `builder` FROM rust:... missing")
    else:
        runs = " ".join(r for i, r in b["lines"] if i == "RUN")
        if "cargo build --release" not in runs or "--locked" not in runs:
            errors.append("builder: needs `cargo build --release --locked`")
        for svc in SERVICES:
            if f"-p {svc}" not in runs:
                errors.append(f"builder: `-p {svc}` missing from cargo build")
        if "--mount=type=cache" not in runs:
            errors.append("builder: no BuildKit cache mount")
    r = stages.get("runtime")
    if not r or not r["from"].startswith("debian:bookworm-slim"):
        errors.append("stage `runtime` FROM debian:bookworm-slim missing")
    for svc, spec in SERVICES.items():
        s = stages.get(svc)
        if not s:
            errors.append(f"final stage `{svc}` missing")
            continue
        if s["from"] != "runtime":
            errors.append(f"stage {svc}: FROM runtime expected, got {s['from']}")
        lines = s["lines"]
        if ("ENTRYPOINT", f'["/usr/local/bin/{svc}"]') not in lines:
            errors.append(f"stage {svc}: ENTRYPOINT [\"/usr/local/bin/{svc}\"] missing")
        if ("EXPOSE", str(spec["port"])) not in lines:
            errors.append(f"stage {svc}: EXPOSE {spec['port']} missing")
        if ("ENV", f"{spec['addr']}=0.0.0.0:{spec['port']}") not in lines:
            errors.append(f"stage {svc}: ENV {spec['addr']}=0.0.0.0:{spec['port']} missing")
        users = [v for i, v in lines if i == "USER"]
        if not users or not users[-1].startswith("10001"):
            errors.append(f"stage {svc}: USER 10001 missing")
    ignore = os.path.join(ROOT, ".dockerignore")
    entries = {x.strip().strip("/") for x in open(ignore, encoding="utf-8").read().splitlines()} if os.path.exists(ignore) else set()
    for e in ("target", ".local", ".git"):
        if e not in entries:
            errors.append(f".dockerignore: {e} not excluded")
    # Paths the build needs (Cargo.toml's patched crates) must reach the
    # build context: excluded by a parent directory, they need an exception.
    cargo_toml = open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8").read()
    for needed in re.findall(r'path\s*=\s*"([^"]+)"', cargo_toml):
        needed = needed.strip("/")
        parts = needed.split("/")
        hidden = any("/".join(parts[:i]) in entries for i in range(1, len(parts) + 1))
        excepted = any(f"!{'/'.join(parts[:i])}" in entries for i in range(1, len(parts) + 1))
        if hidden and not excepted:
            errors.append(f".dockerignore: {needed} (patched in by Cargo.toml) is excluded from the build context")
    return f"{len(stages)} stages ({', '.join(stages)})"


def check_compose(errors: list[str]) -> str:
    path = os.path.join(INFRA, "compose/compose.yaml")
    cdir = os.path.dirname(path)
    doc = load_yaml(path)
    unknown = {k for k in doc if not k.startswith("x-")} - {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    services = doc.get("services") or {}
    if not services:
        errors.append("no services")
    stages = dockerfile_stages(os.path.join(ROOT, "Dockerfile"))
    for name in ("postgres", "nats", "redis", "jaeger", "prometheus", "grafana", *SERVICES):
        if name not in services:
            errors.append(f"service {name} missing")
    for name, s in services.items():
        w = f"services.{name}"
        if not s.get("image") and not s.get("build"):
            errors.append(f"{w}: neither image nor build")
        build = s.get("build")
        if build:
            ctx = os.path.normpath(os.path.join(cdir, build.get("context", ".")))
            if not os.path.isdir(ctx):
                errors.append(f"{w}: build context {build.get('context')} does not exist")
            df = os.path.join(ctx, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(df):
                errors.append(f"{w}: Dockerfile {rel(df)} does not exist")
            elif build.get("target") and build["target"] not in dockerfile_stages(df):
                errors.append(f"{w}: Dockerfile has no stage {build['target']}")
        hc = s.get("healthcheck")
        if not hc or not isinstance(hc.get("test"), list) or hc["test"][0] not in ("CMD", "CMD-SHELL") or len(hc["test"]) < 2:
            errors.append(f"{w}: healthcheck with test [CMD|CMD-SHELL, ...] missing")
        for p in s.get("ports") or []:
            if isinstance(p, dict):
                if p.get("host_ip") != "127.0.0.1":
                    errors.append(f"{w}: port {p} not bound to 127.0.0.1")
            elif not str(p).startswith("127.0.0.1:"):
                errors.append(f"{w}: port {p!r} not bound to 127.0.0.1")
        deps = s.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, cond in deps.items():
            if dep not in services:
                errors.append(f"{w}: depends_on unknown service {dep}")
                continue
            c = (cond or {}).get("condition")
            if c not in ("service_started", "service_healthy", "service_completed_successfully"):
                errors.append(f"{w}: depends_on {dep} without a valid condition")
            if c == "service_healthy" and not services[dep].get("healthcheck"):
                errors.append(f"{w}: waits for {dep} healthy, which has no healthcheck")
        for v in s.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else (v.get("source") if v.get("type") == "bind" else None)
            if src and (src.startswith(".") or src.startswith("/")):
                full = os.path.normpath(os.path.join(cdir, src))
                if not os.path.exists(full):
                    errors.append(f"{w}: mounted {src} does not exist")
    # The three services: settings and wiring.
    for svc, spec in SERVICES.items():
        s = services.get(svc) or {}
        env = {str(k): str(v) for k, v in (s.get("environment") or {}).items()}
        if (s.get("build") or {}).get("target") != svc:
            errors.append(f"services.{svc}: build target {svc} expected")
        for k in sorted(set(env) - SETTINGS[svc]):
            errors.append(f"services.{svc}: {k} is not a setting of {svc} (typo?)")
        if env.get(spec["addr"]) != f"0.0.0.0:{spec['port']}":
            errors.append(f"services.{svc}: {spec['addr']} must be 0.0.0.0:{spec['port']}")
        for k in sorted(spec["required"] - set(env)):
            errors.append(f"services.{svc}: {k} not set")
        if env.get("LOG_FORMAT") != "json":
            errors.append(f"services.{svc}: LOG_FORMAT=json expected")
        otel = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
        m = re.match(r"https?://([^:/]+):4317$", otel)
        if not m or m.group(1) not in services:
            errors.append(f"services.{svc}: OTEL_EXPORTER_OTLP_ENDPOINT must be http://<compose service>:4317, got {otel!r}")
        db = env.get(spec["db"], "")
        m = re.match(r"postgres(?:ql)?://[^@]+@([^:/]+):5432/(\w+)$", db)
        if not m or m.group(1) not in services or m.group(2) != spec["database"]:
            errors.append(f"services.{svc}: {spec['db']} must point at database {spec['database']} of a compose service")
        for k in ("NATS_URL", "REDIS_URL", "CORE_URL"):
            if k in env:
                host = re.sub(r"^\w+://([^:/]+).*$", r"\1", env[k])
                if host not in services:
                    errors.append(f"services.{svc}: {k} host {host} is not a compose service")
    ttl = {services.get(s, {}).get("environment", {}).get("REQUEST_TTL_SECS") for s in ("core-bank", "transfer")}
    if len(ttl) != 1:
        errors.append(f"REQUEST_TTL_SECS differs between core-bank and transfer: {ttl}")
    nats_img = str((services.get("nats") or {}).get("image", ""))
    m = re.match(r"nats:(\d+)\.(\d+)", nats_img)
    if not m or (int(m.group(1)), int(m.group(2))) < (2, 10):
        errors.append(f"services.nats: image {nats_img!r} must be nats >= 2.10 (sync_interval)")
    return f"{len(services)} services, ports on 127.0.0.1, healthchecks, settings known to the services"


def check_nats(errors: list[str]) -> str:
    js_rx = re.compile(r"jetstream\s*\{[^}]*\bsync_interval\s*:\s*always\b", re.S)

    def sync_always(text: str) -> bool:
        """jetstream { sync_interval: always } in a nats.conf, comments ignored."""
        return bool(js_rx.search(re.sub(r"(?m)#.*$", "", text)))

    conf = os.path.join(INFRA, "compose/nats.conf")
    if not sync_always(open(conf, encoding="utf-8").read()):
        errors.append(f"{rel(conf)}: jetstream {{ sync_interval: always }} missing")
    local = os.path.join(INFRA, "k8s/overlays/local/dependencies.yaml")
    confs = [d for d in yaml.safe_load_all(open(local, encoding="utf-8")) if d and d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "nats-config"]
    if not confs or not sync_always(confs[0].get("data", {}).get("nats.conf", "")):
        errors.append(f"{rel(local)}: ConfigMap nats-config without jetstream {{ sync_interval: always }}")
    values = load_yaml(os.path.join(INFRA, "k8s/overlays/production/nats-values.yaml"))
    cfg = values.get("config") or {}
    js = cfg.get("jetstream") or {}
    if not (cfg.get("cluster") or {}).get("enabled") or (cfg.get("cluster") or {}).get("replicas") != 3:
        errors.append("nats-values.yaml: config.cluster must be enabled with 3 replicas")
    if not js.get("enabled"):
        errors.append("nats-values.yaml: config.jetstream.enabled must be true")
    fs = js.get("fileStore") or {}
    if not fs.get("enabled", True) or not (fs.get("pvc") or {}).get("size"):
        errors.append("nats-values.yaml: config.jetstream.fileStore with a pvc size expected")
    if (js.get("merge") or {}).get("sync_interval") != "always":
        errors.append("nats-values.yaml: config.jetstream.merge.sync_interval must be `always`")
    if not (cfg.get("monitor") or {}).get("enabled"):
        errors.append("nats-values.yaml: config.monitor.enabled must be true")
    return "sync_interval: always in compose, local overlay and Helm values"


def check_prometheus(errors: list[str]) -> str:
    path = os.path.join(INFRA, "prometheus/prometheus.yml")
    doc = load_yaml(path)
    unknown = set(doc) - {"global", "rule_files", "scrape_configs", "alerting", "remote_write",
                          "remote_read", "storage", "tracing", "scrape_config_files", "otlp", "runtime"}
    if unknown:
        errors.append(f"unknown top-level keys {sorted(unknown)}")
    for sc in doc.get("scrape_configs") or []:
        if not sc.get("job_name"):
            errors.append("a scrape config without job_name")
    compose = load_yaml(os.path.join(INFRA, "compose/compose.yaml"))
    mounts = {}
    for v in (compose["services"].get("prometheus") or {}).get("volumes") or []:
        parts = v.split(":")
        if len(parts) >= 2 and parts[0].startswith("."):
            mounts[parts[1]] = os.path.normpath(os.path.join(INFRA, "compose", parts[0]))
    rule_files = doc.get("rule_files") or []
    if not rule_files:
        errors.append("rule_files is empty")
    for rf in rule_files:
        if rf not in mounts or not os.path.isfile(mounts[rf]):
            errors.append(f"rule file {rf} is not mounted from an existing file by compose")
    if mounts.get("/etc/prometheus/prometheus.yml") != path:
        errors.append("compose does not mount infra/prometheus/prometheus.yml at /etc/prometheus/prometheus.yml")
    targets = {}
    for sc in doc.get("scrape_configs") or []:
        for st in sc.get("static_configs") or []:
            for t in st.get("targets") or []:
                targets[t] = sc.get("job_name")
    for svc, spec in SERVICES.items():
        if f"{svc}:{spec['port']}" not in targets:
            errors.append(f"no scrape target {svc}:{spec['port']}")
    return f"{len(doc.get('scrape_configs') or [])} scrape jobs, rule files {', '.join(rule_files)}"


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def check_alerts(errors: list[str]) -> str:
    path = os.path.join(INFRA, "prometheus/alerts.yaml")
    doc = load_yaml(path)
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        errors.append("top level must be {groups: [...]}")
        return ""
    names: set[str] = set()
    gnames: set[str] = set()
    count = 0
    for gi, g in enumerate(groups):
        gname = g.get("name")
        if not gname or gname in gnames:
            errors.append(f"groups[{gi}]: missing or duplicate name")
        gnames.add(gname)
        for ri, r in enumerate(g.get("rules") or []):
            count += 1
            w = f"{gname}/{r.get('alert', f'rules[{ri}]')}"
            unknown = set(r) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if unknown:
                errors.append(f"{w}: unknown fields {sorted(unknown)}")
            alert = r.get("alert")
            if not alert or not re.match(r"^[A-Z][A-Za-z0-9]*$", str(alert)):
                errors.append(f"{w}: alert name missing or not CamelCase")
            elif alert in names:
                errors.append(f"{w}: duplicate alert")
            names.add(alert)
            if not isinstance(r.get("expr"), str) or not r["expr"].strip():
                errors.append(f"{w}: expr missing")
                labels_out: set[str] = set()
            else:
                labels_out = check_promql(r["expr"], w, errors)
            if "for" not in r or not DURATION.match(str(r["for"])):
                errors.append(f"{w}: `for` missing or not a duration")
            sev = (r.get("labels") or {}).get("severity")
            if sev not in ("critical", "warning", "info"):
                errors.append(f"{w}: labels.severity must be critical, warning or info")
            ann = r.get("annotations") or {}
            for key in ("summary", "description", "runbook"):
                if not str(ann.get(key, "")).strip():
                    errors.append(f"{w}: annotations.{key} missing")
            for text in ann.values():
                for lab in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", str(text)):
                    if lab not in labels_out:
                        errors.append(f"{w}: annotation uses $labels.{lab}, which the expression does not return ({sorted(labels_out)})")
                if str(text).count("{{") != str(text).count("}}"):
                    errors.append(f"{w}: unbalanced template braces in an annotation")
    for missing in sorted(REQUIRED_ALERTS - names):
        errors.append(f"required alert {missing} missing")
    return f"{len(groups)} groups, {count} rules, PromQL parsed, metric/label names known"


def iter_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels") or [])


def check_grafana(errors: list[str]) -> str:
    path = os.path.join(INFRA, "grafana/dashboards/bank-backbone.json")
    try:
        dash = json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as e:
        errors.append(f"{rel(path)}: invalid JSON: {e}")
        return ""
    if dash.get("schemaVersion") != 39:
        errors.append("schemaVersion must be 39")
    for key in ("uid", "title"):
        if not dash.get(key):
            errors.append(f"dashboard {key} missing")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds_vars = {n for n, v in variables.items() if v.get("type") == "datasource" and v.get("query") == "prometheus"}
    ds_refs = {f"${{{n}}}" for n in ds_vars} | {f"${n}" for n in ds_vars} | {"${DS_PROMETHEUS}"}
    if not ds_vars and "DS_PROMETHEUS" not in json.dumps(dash.get("__inputs", [])):
        errors.append("no Prometheus datasource template variable (or DS_PROMETHEUS input)")
    ids: set[int] = set()
    n = 0
    for p in iter_panels(dash.get("panels") or []):
        n += 1
        w = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            errors.append(f"{w}: duplicate id")
        ids.add(p.get("id"))
        for key in ("title", "type", "gridPos"):
            if not p.get(key):
                errors.append(f"{w}: {key} missing")
        gp = p.get("gridPos") or {}
        if gp and gp.get("x", 0) + gp.get("w", 0) > 24:
            errors.append(f"{w}: wider than the 24-column grid")
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") not in ds_refs:
            errors.append(f"{w}: datasource must be the templated Prometheus datasource")
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{w}: no targets")
        refs: set[str] = set()
        for t in targets:
            tw = f"{w} target {t.get('refId')}"
            if not t.get("refId") or t["refId"] in refs:
                errors.append(f"{tw}: missing or duplicate refId")
            refs.add(t.get("refId"))
            if not str(t.get("expr", "")).strip():
                errors.append(f"{tw}: expr missing")
                continue
            labels = check_promql(t["expr"], tw, errors, grafana=True)
            for lab in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", str(t.get("legendFormat", ""))):
                if lab not in labels:
                    errors.append(f"{tw}: legend uses {{{{{lab}}}}}, which the query does not return ({sorted(labels)})")
    # Provisioning and its wiring in compose.
    prov = os.path.join(INFRA, "grafana/provisioning")
    ds = load_yaml(os.path.join(prov, "datasources/prometheus.yaml"))
    compose = load_yaml(os.path.join(INFRA, "compose/compose.yaml"))
    services = compose.get("services") or {}
    proms = [d for d in ds.get("datasources") or [] if d.get("type") == "prometheus"]
    if ds.get("apiVersion") != 1 or len(proms) != 1:
        errors.append("datasources/prometheus.yaml: apiVersion 1 with one prometheus datasource expected")
    else:
        host = re.sub(r"^https?://([^:/]+).*$", r"\1", str(proms[0].get("url", "")))
        if host not in services:
            errors.append(f"datasources/prometheus.yaml: url host {host} is not a compose service")
    dp = load_yaml(os.path.join(prov, "dashboards/dashboards.yaml"))
    providers = dp.get("providers") or []
    mounts = {}
    for v in (services.get("grafana") or {}).get("volumes") or []:
        parts = v.split(":")
        if len(parts) >= 2 and parts[0].startswith("."):
            mounts[parts[1]] = os.path.normpath(os.path.join(INFRA, "compose", parts[0]))
    if dp.get("apiVersion") != 1 or not providers:
        errors.append("dashboards/dashboards.yaml: apiVersion 1 with providers expected")
    for pr in providers:
        target = (pr.get("options") or {}).get("path")
        if mounts.get(target) != os.path.dirname(path):
            errors.append(f"dashboards/dashboards.yaml: path {target} is not where compose mounts infra/grafana/dashboards")
    if mounts.get("/etc/grafana/provisioning") != prov:
        errors.append("compose does not mount infra/grafana/provisioning at /etc/grafana/provisioning")
    return f"{n} panels, PromQL parsed, metric/label names known, provisioning wired"


# --------------------------------------------------------------------------
# Kubernetes

def quantity(q: Any) -> float:
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


# Expectations per rendered target.
K8S_TARGETS = {
    "base": {"external_secrets": {"bank-secrets"}, "config": {"BANK_TEST_CLOCK": "0", "LOG_FORMAT": "json"},
             "replicas": {"core-bank": 2}, "complete_config": True},
    "overlays/local": {"external_secrets": set(), "config": {"BANK_TEST_CLOCK": "1", "LOG_FORMAT": "json"},
                       "replicas": {"core-bank": 1}, "hpa_max": 1},
    "overlays/production": {"external_secrets": {"bank-secrets", "bank-core-db-app", "bank-channel-db-app"},
                            "config": {"BANK_TEST_CLOCK": "0", "LOG_FORMAT": "json", "NATS_STREAM_REPLICAS": "3"},
                            "replicas": {"core-bank": 3}, "hpa_min": 3, "no_secrets": True, "spread": True,
                            "cnpg": {"bank-core-db": "bank_core", "bank-channel-db": "bank_channel"}},
}


def check_crd_object(o: dict, w: str, errors: list[str]) -> None:
    meta = o.get("metadata") or {}
    if not o.get("apiVersion") or not o.get("kind") or not meta.get("name"):
        errors.append(f"{w}: apiVersion, kind and metadata.name are required")
    if o.get("kind") == "Cluster" and o.get("apiVersion") == "postgresql.cnpg.io/v1":
        spec = o.get("spec") or {}
        if not isinstance(spec.get("instances"), int) or spec["instances"] < 1:
            errors.append(f"{w}: spec.instances must be a positive integer")
        if not (spec.get("storage") or {}).get("size"):
            errors.append(f"{w}: spec.storage.size missing")
        if not ((spec.get("bootstrap") or {}).get("initdb") or {}).get("database"):
            errors.append(f"{w}: spec.bootstrap.initdb.database missing")
        params = (spec.get("postgresql") or {}).get("parameters") or {}
        for k, v in params.items():
            if not isinstance(v, str):
                errors.append(f"{w}: postgresql.parameters.{k} must be a string")


def check_k8s_target(target: str) -> Callable[[list[str]], str]:
    def run(errors: list[str]) -> str:
        import kubernetes_validate.utils as kv

        exp = K8S_TARGETS[target]
        objs = render_kustomize.render(os.path.join(INFRA, "k8s", target))
        validated = crds = 0
        for o in objs:
            w = f"{o['kind']}/{o['metadata']['name']}"
            group = o["apiVersion"].split("/")[0] if "/" in o["apiVersion"] else ""
            if group in CRD_GROUPS:
                crds += 1
                check_crd_object(o, w, errors)
                continue
            try:
                kv.validate(o, KUBERNETES_VERSION, strict=True)
                validated += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{w}: invalid for Kubernetes {KUBERNETES_VERSION}: {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                errors.append(f"{w}: {e.message}")
        policy(objs, exp, errors)
        return f"{len(objs)} objects rendered, {validated} valid against Kubernetes {KUBERNETES_VERSION} (strict), {crds} CRD objects checked for structure"
    return run


def policy(objs: list[dict], exp: dict, errors: list[str]) -> None:
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    hpas = {((o["spec"].get("scaleTargetRef") or {}).get("name")): o for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    if exp.get("no_secrets") and secrets:
        errors.append(f"Secrets with values rendered ({', '.join(secrets)}): production expects externally managed Secrets")
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    if namespaces != {"bank"}:
        errors.append(f"every namespaced object must be in namespace bank, found {namespaces}")
    clusters = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Cluster"}
    if exp.get("complete_config"):
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("bank-config")]
        keys = set((cms[0].get("data") or {}) if cms else {})
        for k in sorted(ALL_SETTINGS - NOT_IN_CONFIGMAP - keys):
            users = ", ".join(svc for svc in SERVICES if k in SETTINGS[svc])
            errors.append(f"setting {k} ({users}) is missing from infra/k8s/base/bank-config.env")
    for name, database in (exp.get("cnpg") or {}).items():
        c = clusters.get(name)
        if not c:
            errors.append(f"CloudNativePG Cluster {name} missing")
            continue
        spec = c.get("spec") or {}
        if spec.get("instances") != 3:
            errors.append(f"Cluster {name}: 3 instances expected")
        if ((spec.get("bootstrap") or {}).get("initdb") or {}).get("database") != database:
            errors.append(f"Cluster {name}: bootstrap.initdb.database {database} expected")
    for svc, spec in SERVICES.items():
        w = f"Deployment/{svc}"
        d = by.get(("Deployment", svc))
        if not d:
            errors.append(f"{w} missing")
            continue
        dspec = d["spec"]
        tmpl = dspec["template"]
        pod = tmpl["spec"]
        tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
        sel = (dspec.get("selector") or {}).get("matchLabels") or {}
        if not sel or any(tlabels.get(k) != v for k, v in sel.items()):
            errors.append(f"{w}: selector {sel} does not match the pod labels")
        containers = {c["name"]: c for c in pod.get("containers") or []}
        c = containers.get(svc)
        if not c:
            errors.append(f"{w}: container {svc} missing")
            continue
        if not c.get("image"):
            errors.append(f"{w}: no image")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if ports.get("http") != spec["port"]:
            errors.append(f"{w}: container port http={spec['port']} expected")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
            pr = c.get(probe) or {}
            get = pr.get("httpGet") or {}
            if not pr:
                errors.append(f"{w}: {probe} missing")
            elif path and (get.get("path") != path or get.get("port") not in ("http", spec["port"])):
                errors.append(f"{w}: {probe} must GET {path} on the http port")
            if probe == "startupProbe" and pr:
                # Migrations run before the listener; a replica waits up to
                # 600 s for another's (common::db::MIGRATION_LOCK_WAIT).
                allowed = int(pr.get("periodSeconds", 10)) * int(pr.get("failureThreshold", 3))
                if allowed < 600:
                    errors.append(f"{w}: startupProbe allows {allowed} s; migrations may wait 600 s")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    errors.append(f"{w}: resources.{part}.{r} missing")
        try:
            if quantity(res["limits"]["memory"]) < 160 * 2**20:
                errors.append(f"{w}: memory limit below 160Mi (the services use up to ~150 MiB)")
            for r in ("cpu", "memory"):
                if quantity(res["requests"][r]) > quantity(res["limits"][r]):
                    errors.append(f"{w}: {r} request above its limit")
        except (KeyError, ValueError, TypeError):
            pass
        psc = pod.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            errors.append(f"{w}: runAsNonRoot not set")
        if csc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{w}: readOnlyRootFilesystem must be true")
        if csc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{w}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            errors.append(f"{w}: capabilities must drop ALL")
        if ((csc.get("seccompProfile") or psc.get("seccompProfile")) or {}).get("type") != "RuntimeDefault":
            errors.append(f"{w}: seccompProfile RuntimeDefault expected")
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(spec["port"]) or ann.get("prometheus.io/path", "/metrics") != "/metrics":
            errors.append(f"{w}: prometheus.io/scrape|port|path annotations expected on the pod template")
        # Environment: the ConfigMap plus the container's own variables.
        env: dict[str, str | None] = {}
        for ef in c.get("envFrom") or []:
            ref = (ef.get("configMapRef") or {}).get("name")
            if ref:
                cm = configmaps.get(ref)
                if not cm:
                    errors.append(f"{w}: envFrom ConfigMap {ref} is not rendered")
                    continue
                for k in sorted(set(cm.get("data") or {}) - ALL_SETTINGS):
                    errors.append(f"ConfigMap/{ref}: {k} is not a setting of any service (typo?)")
                env.update(cm.get("data") or {})
            elif ef.get("secretRef"):
                errors.append(f"{w}: envFrom secretRef not expected (secrets come key by key)")
        for e in c.get("env") or []:
            name = e["name"]
            if name not in SETTINGS[svc]:
                errors.append(f"{w}: env {name} is not a setting of {svc} (typo?)")
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                sname, key = ref.get("name"), ref.get("key")
                if sname in secrets:
                    data = secrets[sname].get("data") or {}
                    if key not in data and not ref.get("optional"):
                        errors.append(f"{w}: Secret {sname} has no key {key}")
                elif sname not in exp["external_secrets"]:
                    errors.append(f"{w}: Secret {sname} is neither rendered nor an expected external Secret")
                elif sname.endswith("-app") and sname[: -len("-app")] not in clusters:
                    errors.append(f"{w}: Secret {sname} would come from CloudNativePG Cluster {sname[:-4]}, which is not rendered")
                env[name] = None
            elif (e.get("valueFrom") or {}).get("configMapKeyRef"):
                env[name] = None
            else:
                env[name] = str(e.get("value", ""))
        if env.get(spec["addr"]) != f"0.0.0.0:{spec['port']}":
            errors.append(f"{w}: {spec['addr']} must be 0.0.0.0:{spec['port']}, got {env.get(spec['addr'])!r}")
        for k in sorted(spec["required"] - set(env)):
            errors.append(f"{w}: {k} not set")
        for k, v in exp["config"].items():
            if k in SETTINGS[svc] and env.get(k) != v:
                errors.append(f"{w}: {k}={v} expected, got {env.get(k)!r}")
        drain = env.get("SHUTDOWN_DRAIN_DELAY_MS")
        if drain != "5000":
            errors.append(f"{w}: SHUTDOWN_DRAIN_DELAY_MS=5000 expected, got {drain!r}")
        else:
            timeout_ms = int(env.get("HTTP_REQUEST_TIMEOUT_MS") or 30000)
            # The transfer service then waits for executions that outlived
            # their answers: at most CORE_TIMEOUT_MS + 7000 ms.
            executions_ms = int(env.get("CORE_TIMEOUT_MS") or 3000) + 7000 if svc == "transfer" else 0
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace * 1000 <= int(drain) + timeout_ms + executions_ms:
                errors.append(f"{w}: terminationGracePeriodSeconds {grace} does not cover drain {drain} ms + request timeout {timeout_ms} ms + executions {executions_ms} ms")
        # Service, PodDisruptionBudget, autoscaler.
        s = by.get(("Service", svc))
        if not s:
            errors.append(f"Service/{svc} missing")
        else:
            ssel = s["spec"].get("selector") or {}
            if not ssel or any(tlabels.get(k) != v for k, v in ssel.items()):
                errors.append(f"Service/{svc}: selector does not match the pods")
            if not any(p.get("port") == spec["port"] and p.get("targetPort") in ("http", spec["port"]) for p in s["spec"].get("ports") or []):
                errors.append(f"Service/{svc}: port {spec['port']} -> http expected")
            if s["spec"].get("type", "ClusterIP") != "ClusterIP":
                errors.append(f"Service/{svc}: ClusterIP expected")
        pdb = by.get(("PodDisruptionBudget", svc))
        if not pdb:
            errors.append(f"PodDisruptionBudget/{svc} missing")
        elif any(tlabels.get(k) != v for k, v in ((pdb["spec"].get("selector") or {}).get("matchLabels") or {}).items()):
            errors.append(f"PodDisruptionBudget/{svc}: selector does not match the pods")
        hpa = hpas.get(svc)
        if svc in ("transfer", "projector"):
            if not hpa:
                errors.append(f"HorizontalPodAutoscaler for {svc} missing")
            else:
                if hpa["apiVersion"] != "autoscaling/v2" or hpa["spec"]["scaleTargetRef"].get("kind") != "Deployment":
                    errors.append(f"HorizontalPodAutoscaler/{svc}: autoscaling/v2 targeting the Deployment expected")
                cpu = [m for m in hpa["spec"].get("metrics") or [] if (m.get("resource") or {}).get("name") == "cpu"]
                if not cpu or cpu[0]["resource"]["target"].get("averageUtilization") != 70:
                    errors.append(f"HorizontalPodAutoscaler/{svc}: CPU target 70% expected")
                if "replicas" in dspec:
                    errors.append(f"{w}: sets spec.replicas although an autoscaler owns it")
                if "hpa_min" in exp and hpa["spec"].get("minReplicas", 1) < exp["hpa_min"]:
                    errors.append(f"HorizontalPodAutoscaler/{svc}: minReplicas >= {exp['hpa_min']} expected")
                if "hpa_max" in exp and hpa["spec"].get("maxReplicas") != exp["hpa_max"]:
                    errors.append(f"HorizontalPodAutoscaler/{svc}: maxReplicas {exp['hpa_max']} expected")
        want = (exp.get("replicas") or {}).get(svc)
        if want is not None and dspec.get("replicas", 1) != want:
            errors.append(f"{w}: {want} replicas expected, got {dspec.get('replicas', 1)}")
        if exp.get("spread"):
            keys = {t.get("topologyKey") for t in pod.get("topologySpreadConstraints") or []}
            if not {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys:
                errors.append(f"{w}: topologySpreadConstraints over hostname and zone expected")


def main() -> int:
    report("metrics", check_metrics)
    report("dockerfile", check_dockerfile)
    report("compose", check_compose)
    report("nats", check_nats)
    report("prometheus", check_prometheus)
    report("alerts", check_alerts)
    report("grafana", check_grafana)
    for target in K8S_TARGETS:
        report(f"k8s:{target}", check_k8s_target(target))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
