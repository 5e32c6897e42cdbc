#!/usr/bin/env python3
"""Helpers for scripts/check-ops (run with the venv in target/ops/venv).

Each subcommand prints what it found and exits non-zero on a failure:

  render DIR                     the kustomize base as one multi-document YAML
  same-objects OURS THEIRS       two renderings hold the same objects (ours vs kubectl kustomize)
  prometheusrule                 k8s/prometheusrule.yaml, generated from alerts/peregrine.rules.yaml
  rules-match RENDERED OUT       the PrometheusRule's spec equals the rules file; writes the spec to OUT
  operator-objects RENDERED OUT  the prometheus-operator objects as a JSON array
  strict-schema SCHEMA... --objects JSON   each object against the schema of its kind
  policy RENDERED                what docs/operations.md promises about the manifests
  runbooks RULES DOCS            every alert has severity, summary, description and a runbook section
  validate-json SCHEMA DOC [--expect-invalid]
  dashboard-lint DASHBOARD
  provisioning DIR DASHBOARD
  service-env RENDERED CONFIG_OUT HTTP_ADDR   the Deployment's environment for a local run
  metric-names METRICS DASHBOARD RULES
  live-queries PROM_URL --dashboard FILE | --rules FILE   every query returns data
  live-rules-loaded PROM_URL RULES
  live-unknown-metric PROM_URL
"""

import argparse
import json
import math
import re
import sys
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "alerts" / "peregrine.rules.yaml"

# The input topic's default partition count (scripts/kafka-up, docs): the HPA
# may not scale past it.
PARTITIONS = 6

# Values for the dashboard's template variables when its queries run in the
# check. The windows are wide enough to hold the whole simulated traffic.
TEMPLATE_VALUES = {
    "datasource": "prometheus",
    "job": "peregrine",
    "instance": ".*",
    "__rate_interval": "2m",
    "__interval": "15s",
    "__range": "5m",
}


def exit_on(problems):
    """Prints each problem found and exits 1 if there was any."""
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)


def fail(msg):
    print(msg)
    sys.exit(1)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---------------------------------------------------------------- kustomize


def render(directory):
    """The base's resources in order. Only `resources` is supported: anything
    else in kustomization.yaml is refused rather than silently ignored."""
    directory = Path(directory)
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources"}
    if unknown:
        fail(f"{directory}/kustomization.yaml: this renderer only knows `resources`, not {sorted(unknown)}")
    docs = []
    for res in kust.get("resources", []):
        path = directory / res
        docs += render(path) if path.is_dir() else load_docs(path)
    return docs


def cmd_render(a):
    docs = render(a.dir)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))


def key(obj):
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))


def cmd_same_objects(a):
    """Two renderings (ours and `kubectl kustomize`) hold the same objects."""
    ours = {key(o): o for o in load_docs(a.ours)}
    theirs = {key(o): o for o in load_docs(a.theirs)}
    if ours.keys() != theirs.keys():
        fail(f"different objects: only ours {sorted(ours.keys() - theirs.keys())}, only kubectl's {sorted(theirs.keys() - ours.keys())}")
    diff = [k for k in ours if ours[k] != theirs[k]]
    if diff:
        fail(f"objects differ from kubectl kustomize's: {diff}")
    print(f"{len(ours)} objects, identical to kubectl kustomize's")


# ---------------------------------------------------------------- rules


PROMETHEUSRULE_HEADER = """\
# Generated from alerts/peregrine.rules.yaml by `scripts/ops/ops.py prometheusrule`;
# edit that file and regenerate (scripts/check-ops fails if they differ).
# The label lets a Prometheus Operator whose ruleSelector asks for it find
# these rules; match it to your Prometheus' ruleSelector.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: peregrine
  labels:
    app.kubernetes.io/name: peregrine
    app.kubernetes.io/part-of: peregrine
    role: alert-rules
spec:
"""


def cmd_prometheusrule(a):
    # Indents the rules file under `spec:` as text, so its comments and block
    # scalars survive.
    lines = RULES_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line else line for line in lines[start:])
    sys.stdout.write(PROMETHEUSRULE_HEADER + body + "\n")


def cmd_rules_match(a):
    rules = [o for o in load_docs(a.rendered) if o.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        fail(f"expected one PrometheusRule in the rendered base, found {len(rules)}")
    spec = rules[0]["spec"]
    plain = yaml.safe_load(RULES_FILE.read_text())
    if spec != plain:
        fail("k8s/prometheusrule.yaml's spec differs from alerts/peregrine.rules.yaml: "
             "run `target/ops/venv/bin/python scripts/ops/ops.py prometheusrule > k8s/prometheusrule.yaml`")
    Path(a.out).write_text(yaml.safe_dump(spec, sort_keys=False))
    n = sum(len(g["rules"]) for g in spec["groups"])
    print(f"PrometheusRule spec equals alerts/peregrine.rules.yaml ({n} rules); unwrapped to {a.out}")


# ---------------------------------------------------------------- schemas


OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def cmd_operator_objects(a):
    objs = [o for o in load_docs(a.rendered) if o.get("apiVersion", "").startswith("monitoring.coreos.com/")]
    kinds = sorted({o["kind"] for o in objs})
    if set(kinds) != OPERATOR_KINDS:
        fail(f"expected exactly the kinds {sorted(OPERATOR_KINDS)} from monitoring.coreos.com, found {kinds}")
    Path(a.out).write_text(json.dumps(objs))
    names = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
    print(f"{len(objs)} prometheus-operator objects: {names}")


def schema_errors(schema, doc):
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors:
        # anyOf failures say little; their closest sub-error says what is wrong.
        best = jsonschema.exceptions.best_match([e])
        path = "/".join(str(p) for p in best.absolute_path) or "(root)"
        out.append(f"{path}: {best.message[:300]}")
    return out


def cmd_strict_schema(a):
    """Unknown fields: the CRD schemas let the API server prune them silently,
    so the check compares against schemas generated from the models' types,
    which list every field."""
    schemas = {}
    for path in a.schemas:
        kind = Path(path).name.split(".")[0]
        schemas[kind] = json.loads(Path(path).read_text())
    bad = 0
    for obj in json.loads(Path(a.objects).read_text()):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        errs = schema_errors(schemas[obj["kind"]], obj)
        for e in errs:
            print(f"{name}: {e}")
        bad += bool(errs)
        if not errs:
            print(f"{name}: no unknown or ill-typed field")
    sys.exit(1 if bad else 0)


def cmd_validate_json(a):
    schema = json.loads(Path(a.schema).read_text())
    doc = json.loads(Path(a.doc).read_text())
    errs = schema_errors(schema, doc)
    if a.expect_invalid:
        if not errs:
            fail(f"{a.doc} was accepted but is broken on purpose")
        print(f"{a.doc} rejected as it should be: {errs[0]}")
        return
    for e in errs[:40]:
        print(e)
    if errs:
        fail(f"{a.doc}: {len(errs)} schema errors")
    print(f"{a.doc} matches the schema")


# ---------------------------------------------------------------- policy


def pod_labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def cmd_policy(a):
    docs = load_docs(a.rendered)
    by_kind = {}
    for o in docs:
        by_kind.setdefault(o["kind"], []).append(o)
    problems = []

    def need(cond, what):
        if not cond:
            problems.append(what)

    need("Secret" not in by_kind, "the base must reference Secrets, not contain them")
    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    need(pod_labels_match(dep["spec"]["selector"], labels), "Deployment selector does not match its pod labels")
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c.get("env", [])}

    # Settings the pod runs with: the mounted ConfigMap's file, then the env.
    cfg_path = env.get("PEREGRINE_CONFIG", {}).get("value")
    need(cfg_path, "PEREGRINE_CONFIG is not set")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    settings = {}
    if cfg_path:
        mount_dir, file_key = cfg_path.rsplit("/", 1)
        vol = volumes.get(mounts.get(mount_dir, ""), {})
        cm_name = vol.get("configMap", {}).get("name")
        cms = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
        need(cm_name in cms, f"{cfg_path} is not on a volume of a ConfigMap of the base")
        if cm_name in cms:
            need(file_key in cms[cm_name]["data"], f"ConfigMap {cm_name} has no key {file_key}")
            settings = tomllib.loads(cms[cm_name]["data"].get(file_key, ""))
    shutdown = settings.get("shutdown_timeout_secs", 20)

    # Secrets by reference only, as the docs describe them.
    for name in ("PEREGRINE_ADMIN_TOKEN", "PEREGRINE_LIBRDKAFKA_SASL_PASSWORD"):
        ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
        need(ref and ref.get("name") == "peregrine-secrets", f"{name} must come from the Secret peregrine-secrets")
    need("admin_token" not in settings, "admin_token must not be in the ConfigMap")

    need(pod.get("enableServiceLinks") is False,
         "enableServiceLinks must be false: the service refuses the PEREGRINE_SERVICE_* variables Kubernetes would inject")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    need(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, "the pod must run as a non-root user")
    need(csc.get("readOnlyRootFilesystem") is True, "the root filesystem must be read-only")
    need(csc.get("allowPrivilegeEscalation") is False, "privilege escalation must be off")
    need("ALL" in csc.get("capabilities", {}).get("drop", []), "all capabilities must be dropped")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    need(seccomp == "RuntimeDefault", "seccomp profile must be RuntimeDefault")

    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    http_addr = env.get("PEREGRINE_HTTP_ADDR", {}).get("value", settings.get("http_addr", "127.0.0.1:8080"))
    need(http_addr.startswith("0.0.0.0:"), f"the HTTP address {http_addr} must listen on all interfaces in a pod")
    need(ports.get("http") == int(http_addr.rsplit(":", 1)[1]), "container port `http` must be the HTTP address' port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        need(get.get("path") == path and get.get("port") in ports, f"{probe} must GET {path} on a named container port")
    for kind in ("requests", "limits"):
        res = c.get("resources", {}).get(kind, {})
        need("cpu" in res and "memory" in res, f"resources.{kind} must set cpu and memory")

    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    grace = pod.get("terminationGracePeriodSeconds", 30)
    need(grace > pause + shutdown,
         f"terminationGracePeriodSeconds {grace} must exceed the preStop pause {pause} + shutdown_timeout_secs {shutdown}")
    surge = dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge")
    need(surge == 0, "maxSurge must be 0: a surge pod beyond the partition count never becomes ready")

    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    need(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "the HPA must scale the Deployment")
    need(hpa["spec"]["maxReplicas"] <= PARTITIONS,
         f"HPA maxReplicas {hpa['spec']['maxReplicas']} exceeds the input topic's {PARTITIONS} partitions")
    need(hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"], "HPA minReplicas above maxReplicas")

    (svc,) = by_kind["Service"]
    need(pod_labels_match({"matchLabels": svc["spec"]["selector"]}, labels), "the Service selects no pod")
    need(all(p["targetPort"] in ports or p["targetPort"] in ports.values() for p in svc["spec"]["ports"]),
         "a Service targetPort is not a container port")
    (pdb,) = by_kind["PodDisruptionBudget"]
    need(pod_labels_match(pdb["spec"]["selector"], labels), "the PodDisruptionBudget selects no pod")
    (np,) = by_kind["NetworkPolicy"]
    need(pod_labels_match(np["spec"]["podSelector"], labels), "the NetworkPolicy selects no pod")
    (sm,) = by_kind["ServiceMonitor"]
    need(pod_labels_match(sm["spec"]["selector"], svc["metadata"]["labels"]), "the ServiceMonitor selects no Service")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    need(all(e.get("port") in svc_ports for e in sm["spec"]["endpoints"]), "a ServiceMonitor endpoint names no Service port")
    # The rules and the dashboard expect job="peregrine", which the operator
    # takes from the Service's name unless jobLabel says otherwise.
    need(svc["metadata"]["name"] == "peregrine" and "jobLabel" not in sm["spec"],
         "the scrape job must be named peregrine (the Service's name)")

    exit_on(problems)
    print(f"{len(docs)} objects: probes, security context, secrets by reference, grace {grace}s > "
          f"{pause}s + {shutdown}s, HPA max {hpa['spec']['maxReplicas']} <= {PARTITIONS} partitions, selectors match")


def anchor(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def cmd_runbooks(a):
    """Every alert has a severity, a summary, a description, and a runbook
    link to a section of the operations doc that exists."""
    rules = yaml.safe_load(Path(a.rules).read_text())
    doc_path = a.docs
    anchors = {anchor(m) for m in re.findall(r"^#+ (.+)$", Path(doc_path).read_text(), re.M)}
    problems, n = [], 0
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" not in r:
                continue
            n += 1
            name, ann = r["alert"], r.get("annotations", {})
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problems.append(f"{name}: severity must be critical, warning or info")
            for field in ("summary", "description", "runbook_url"):
                if not ann.get(field):
                    problems.append(f"{name}: no {field} annotation")
            url = ann.get("runbook_url", "")
            path, _, frag = url.partition("#")
            if path != doc_path or frag != name.lower() or frag not in anchors:
                problems.append(f"{name}: runbook_url {url!r} must be {doc_path}#{name.lower()}, a section of that doc")
    exit_on(problems)
    print(f"{n} alerts, each with a severity, a summary, a description and a runbook section in {doc_path}")


# ---------------------------------------------------------------- dashboard


def all_panels(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])


# The two datasources the dashboard reads, each through its variable:
# Prometheus (metrics) and the PostgreSQL alert store (alerts, decisions).
PROMETHEUS_REF = {"type": "prometheus", "uid": "${datasource}"}
POSTGRES_TYPE = "grafana-postgresql-datasource"
ALERTSTORE_REF = {"type": POSTGRES_TYPE, "uid": "${alertstore}"}
# The only Grafana macros the SQL may use, and the formats of an SQL target.
SQL_MACROS = {"__timeFilter", "__timeFrom", "__timeTo"}
SQL_FORMATS = {"table", "time_series"}


def is_prometheus(ref):
    """A target, panel or variable on Prometheus; none named is the default
    datasource, which provisioning makes Prometheus."""
    return (ref or {}).get("type", "prometheus") == "prometheus"


def cmd_dashboard_lint(a):
    d = json.loads(Path(a.dashboard).read_text())
    problems = []
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` template variable of type datasource for prometheus")
    store = variables.get("alertstore", {})
    if store.get("type") != "datasource" or store.get("query") != POSTGRES_TYPE:
        problems.append(f"no `alertstore` template variable of type datasource for {POSTGRES_TYPE}")
    for v in variables.values():
        if "datasource" in v and v["datasource"] not in (PROMETHEUS_REF, ALERTSTORE_REF):
            problems.append(f"variable {v['name']} uses neither the datasource nor the alertstore variable")
    ids = [p["id"] for p in all_panels(d)]
    if len(ids) != len(set(ids)):
        problems.append("panel ids are not unique")
    panels = [p for p in all_panels(d) if p["type"] != "row"]
    n_sql = 0
    for p in panels:
        where = f"panel {p.get('title')!r}"
        if not p.get("description"):
            problems.append(f"{where} has no description")
        sql = (p.get("datasource") or {}).get("type") == POSTGRES_TYPE
        n_sql += sql
        if sql and p.get("datasource") != ALERTSTORE_REF:
            problems.append(f"{where} does not use the alertstore variable")
        if not sql and p.get("datasource") != PROMETHEUS_REF:
            problems.append(f"{where} does not use the datasource variable")
        if not p.get("targets"):
            problems.append(f"{where} has no query")
        for t in p.get("targets", []):
            what = f"{where} query {t.get('refId')}"
            if t.get("datasource", p.get("datasource")) != p.get("datasource"):
                problems.append(f"{what} uses another datasource")
            if not sql:
                if not t.get("expr"):
                    problems.append(f"{what} has no expr")
                continue
            if not t.get("rawSql"):
                problems.append(f"{what} has no rawSql")
            if t.get("format") not in SQL_FORMATS:
                problems.append(f"{what}: format must be one of {sorted(SQL_FORMATS)}, not {t.get('format')!r}")
            for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", t.get("rawSql", "")):
                name = m.group(1) or m.group(2)
                if name.startswith("__") and name not in SQL_MACROS:
                    problems.append(f"{what}: macro ${name} is not one of {sorted(SQL_MACROS)}")
                elif not name.startswith("__") and name not in variables:
                    problems.append(f"{what}: ${name} is no template variable")
    rows = [p["title"] for p in all_panels(d) if p["type"] == "row"]
    exit_on(problems)
    print(f"{len(panels)} panels in {len(rows)} rows ({', '.join(rows)}), each with a description and the datasource "
          f"variable ({n_sql} of them on the alertstore variable, with rawSql and a format)")


def cmd_provisioning(a):
    base = Path(a.dir)
    d = json.loads(Path(a.dashboard).read_text())
    (ds_file,) = sorted((base / "datasources").glob("*.yaml"))
    (db_file,) = sorted((base / "dashboards").glob("*.yaml"))
    ds = yaml.safe_load(ds_file.read_text())
    db = yaml.safe_load(db_file.read_text())
    problems = []
    proms = [s for s in ds.get("datasources", []) if s.get("type") == "prometheus"]
    if ds.get("apiVersion") != 1 or len(proms) != 1:
        problems.append(f"{ds_file}: expected apiVersion 1 and one prometheus datasource")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    default = variables["datasource"]["current"]["value"]
    if proms and proms[0].get("uid") != default:
        problems.append(f"the datasource uid {proms[0].get('uid')!r} is not the dashboard's default {default!r}")
    # The alert store: one PostgreSQL datasource, the alertstore variable's
    # default, its password from Grafana's environment, never in the file.
    pgs = [s for s in ds.get("datasources", []) if s.get("type") == POSTGRES_TYPE]
    others = [s.get("type") for s in ds.get("datasources", []) if s.get("type") not in ("prometheus", POSTGRES_TYPE)]
    if len(pgs) != 1 or others:
        problems.append(f"{ds_file}: expected one {POSTGRES_TYPE} datasource besides Prometheus, "
                        f"found {len(pgs)} and other types {others}")
    store_default = variables.get("alertstore", {}).get("current", {}).get("value")
    if pgs and pgs[0].get("uid") != store_default:
        problems.append(f"the alert store's uid {pgs[0].get('uid')!r} is not the alertstore variable's default {store_default!r}")
    if pgs and not re.fullmatch(r"\$\{\w+\}", str(pgs[0].get("secureJsonData", {}).get("password", ""))):
        problems.append("the alert store's secureJsonData.password must be an ${ENV_VAR} Grafana expands, not a literal")
    files = [p for p in db.get("providers", []) if p.get("type") == "file"]
    if db.get("apiVersion") != 1 or len(files) != 1 or not files[0].get("options", {}).get("path"):
        problems.append(f"{db_file}: expected apiVersion 1 and one file provider with a path")
    docs = (ROOT / "docs" / "operations.md").read_text()
    if files and files[0]["options"]["path"] not in docs:
        problems.append(f"docs/operations.md does not say where to mount the dashboard ({files[0]['options']['path']})")
    exit_on(problems)
    print(f"datasource {proms[0]['name']!r} (uid {proms[0]['uid']}), alert store {pgs[0]['name']!r} "
          f"(uid {pgs[0]['uid']}), dashboards from {files[0]['options']['path']}")


# ---------------------------------------------------------------- local run


def cmd_service_env(a):
    """The Deployment's environment, made runnable here: its ConfigMap file
    written out, secrets replaced by dummies, the HTTP address on loopback."""
    docs = load_docs(a.rendered)
    (dep,) = [o for o in docs if o["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    cms = {o["metadata"]["name"]: o for o in docs if o["kind"] == "ConfigMap"}
    out = []
    for e in c.get("env", []):
        name = e["name"]
        if name == "PEREGRINE_CONFIG":
            cm = next(iter(cms.values()))
            file_key = e["value"].rsplit("/", 1)[1]
            Path(a.config_out).write_text(cm["data"][file_key])
            out.append(f"{name}={a.config_out}")
        elif name == "PEREGRINE_HTTP_ADDR":
            out.append(f"{name}={a.http_addr}")
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            if not ref.get("optional"):
                out.append(f"{name}=check-ops-{ref['key']}-0123456789")
        else:
            out.append(f"{name}={e['value']}")
    print("\n".join(out))


# ---------------------------------------------------------------- PromQL

SET_OPS = ("or", "and", "unless")  # lowest precedence first
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
MODIFIER = re.compile(r"^\s*(bool\b)?\s*((on|ignoring)\s*\([^)]*\))?\s*((group_left|group_right)\s*(\([^)]*\))?)?")


def top_level(expr):
    """Yields (index, char) of expr outside brackets and strings."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, ch
        i += 1


def closing(expr, start):
    """The index of the bracket that closes the one at start, or -1."""
    depth, quote, i = 0, None, start
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def strip_parens(expr):
    """`(a > 1)` is `a > 1`; `(a) / (b)` stays as it is."""
    expr = expr.strip()
    while expr.startswith("(") and closing(expr, 0) == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def split_word(expr, word):
    positions = [i for i, _ in top_level(expr)]
    allowed = set(positions)
    parts, last = [], 0
    for m in re.finditer(rf"(?<![\w:]){word}(?![\w:])", expr):
        if m.start() in allowed:
            parts.append(expr[last:m.start()])
            last = m.end()
    if not parts:
        return None
    parts.append(expr[last:])
    return parts


def split_comparison(expr):
    chars = dict(top_level(expr))
    i = 0
    while i < len(expr):
        if i in chars:
            for op in COMPARISONS:
                if expr.startswith(op, i) and all(j in chars for j in range(i, i + len(op))):
                    # `=~` and `!~` never stand at top level; `==`/`!=` need both chars.
                    return expr[:i], expr[i + len(op):]
        i += 1
    return None


def sides(expr):
    """The queries an alert's truth depends on: every side of every
    comparison, through and/or/unless, without the numbers."""
    expr = strip_parens(expr)
    for word in SET_OPS:
        parts = split_word(expr, word)
        if parts:
            out = []
            for p in parts:
                out += sides(MODIFIER.sub("", p, count=1))
            return out
    cmp = split_comparison(expr)
    if cmp:
        left, right = cmp
        return sides(left) + sides(MODIFIER.sub("", right, count=1))
    return [] if NUMBER.match(expr) else [expr]


def substitute(expr):
    def value(m):
        name = m.group(1) or m.group(2)
        if name not in TEMPLATE_VALUES:
            raise KeyError(f"unknown template variable ${name}")
        return TEMPLATE_VALUES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def dashboard_queries(dashboard):
    """The dashboard's PromQL: the alert store's SQL (variables, panels and
    targets on another datasource) is left out, never sent to Prometheus."""
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v["type"] == "query" and is_prometheus(v.get("datasource")):
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            if not m:
                raise ValueError(f"variable {v['name']}: cannot translate {q!r} to PromQL")
            out.append((f"variable {v['name']}", f"group by ({m.group(2)}) ({m.group(1)})"))
    for p in all_panels(dashboard):
        for t in p.get("targets", []):
            if is_prometheus(t.get("datasource") or p.get("datasource")):
                out.append((f"panel {p['title']!r} query {t['refId']}", t["expr"]))
    return out


def rule_queries(rules):
    out = []
    for g in rules["groups"]:
        for r in g["rules"]:
            if "record" in r:
                out.append((f"recording rule {r['record']}", r["expr"]))
            else:
                for i, s in enumerate(sides(r["expr"])):
                    out.append((f"alert {r['alert']} side {i + 1}", s))
    return out


def prom_query(url, expr):
    q = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        return json.load(e)


def check_query(url, what, expr):
    """None if the query returns at least one number, else why not."""
    try:
        expr = substitute(expr)
    except KeyError as e:
        return f"{what}: {e.args[0]}: {expr}"
    r = prom_query(url, expr)
    if r.get("status") != "success":
        return f"{what}: {r.get('errorType')}: {r.get('error')}\n    query: {expr}"
    result = r["data"]["result"]
    if r["data"]["resultType"] == "scalar":
        result = [{"value": result}]
    values = [float(s["value"][1]) for s in result]
    if not values:
        return f"{what}: no data\n    query: {expr}"
    if all(math.isnan(v) for v in values):
        return f"{what}: only NaN (no events in the window)\n    query: {expr}"
    numbers = [v for v in values if not math.isnan(v)]
    print(f"{what}: {len(values)} series, {min(numbers):.6g} .. {max(numbers):.6g}")
    return None


def run_queries(url, queries):
    failures = [f for f in (check_query(url, w, e) for w, e in queries) if f]
    for f in failures:
        print(f"FAILED {f}")
    return failures


def cmd_live_queries(a):
    if a.dashboard:
        queries = dashboard_queries(json.loads(Path(a.dashboard).read_text()))
    else:
        queries = rule_queries(yaml.safe_load(Path(a.rules).read_text()))
    failures = run_queries(a.prometheus, queries)
    if failures:
        fail(f"{len(failures)} of {len(queries)} queries returned no data")
    print(f"all {len(queries)} queries returned data")


def cmd_live_unknown_metric(a):
    fake = [("panel 'deliberately wrong'", 'sum(rate(peregrine_nonexistent_total{job=~"$job"}[$__rate_interval]))')]
    failures = run_queries(a.prometheus, fake)
    if not failures:
        fail("a query on a metric the service does not export returned data: the check cannot tell")
    print("a panel on peregrine_nonexistent_total is flagged, as it should be")


def cmd_live_rules_loaded(a):
    with urllib.request.urlopen(f"{a.prometheus}/api/v1/rules", timeout=10) as resp:
        loaded = json.load(resp)["data"]["groups"]
    want = yaml.safe_load(Path(a.rules).read_text())
    names = {(r.get("alert") or r.get("record")) for g in want["groups"] for r in g["rules"]}
    got = {r["name"]: r for g in loaded for r in g["rules"]}
    problems = [f"{n}: not loaded" for n in sorted(names - got.keys())]
    problems += [f"{n}: health {r.get('health')}: {r.get('lastError')}" for n, r in got.items()
                 if r.get("health") != "ok"]
    exit_on(problems)
    print(f"Prometheus evaluates all {len(names)} rules without error")


def cmd_metric_names(a):
    """Every metric a panel or rule names is one the service exports (or a
    rule records), so a typo fails even where `or vector(0)` would hide it."""
    exported = {"up"}
    for line in Path(a.metrics).read_text().splitlines():
        if line and not line.startswith("#"):
            exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    rules = yaml.safe_load(Path(a.rules).read_text())
    exported |= {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    queries = dashboard_queries(json.loads(Path(a.dashboard).read_text())) + [
        (f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in rules["groups"] for r in g["rules"]
    ]
    problems, names = [], set()
    for what, expr in queries:
        for name in re.findall(r"(?<![\w:$])(peregrine_\w+|job:peregrine\w*:\w+|up)(?=\s*[{\[),\s])", expr + " "):
            names.add(name)
            if name not in exported:
                problems.append(f"{what}: {name} is not exported by the service")
    exit_on(problems)
    print(f"all {len(names)} metric names in the dashboard and rules are exported")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)

    def add(name, fn, *args, **flags):
        p = sub.add_parser(name)
        for arg in args:
            p.add_argument(arg, nargs="+" if arg == "schemas" else None)
        for flag, kw in flags.items():
            p.add_argument(f"--{flag.replace('_', '-')}", **kw)
        p.set_defaults(fn=fn)

    add("render", cmd_render, "dir")
    add("same-objects", cmd_same_objects, "ours", "theirs")
    add("prometheusrule", cmd_prometheusrule)
    add("rules-match", cmd_rules_match, "rendered", "out")
    add("operator-objects", cmd_operator_objects, "rendered", "out")
    add("strict-schema", cmd_strict_schema, "schemas", objects={"required": True})
    add("validate-json", cmd_validate_json, "schema", "doc", expect_invalid={"action": "store_true"})
    add("policy", cmd_policy, "rendered")
    add("runbooks", cmd_runbooks, "rules", "docs")
    add("dashboard-lint", cmd_dashboard_lint, "dashboard")
    add("provisioning", cmd_provisioning, "dir", "dashboard")
    add("service-env", cmd_service_env, "rendered", "config_out", "http_addr")
    add("metric-names", cmd_metric_names, "metrics", "dashboard", "rules")
    add("live-queries", cmd_live_queries, "prometheus", dashboard={}, rules={})
    add("live-rules-loaded", cmd_live_rules_loaded, "prometheus", "rules")
    add("live-unknown-metric", cmd_live_unknown_metric, "prometheus")
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
