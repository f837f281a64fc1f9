#!/usr/bin/env python3
"""A small kustomize renderer, so `make lint-infra` needs no kubectl.

It supports exactly the subset of kustomize that infra/k8s uses and refuses
anything else (an unknown kustomization field is an error, never ignored):

  resources            files (multi-document YAML) and directories (nested
                       kustomizations)
  namespace            set on every namespaced object
  labels               pairs, includeTemplates (includeSelectors must be false)
  images               name -> newName / newTag / digest
  replicas             name -> count (Deployment, StatefulSet)
  configMapGenerator   literals, envs (KEY=VALUE files); behavior create/merge/replace
  secretGenerator      literals; behavior create/merge/replace; type
  generatorOptions     disableNameSuffixHash
  patches              strategic merge patches from `path` or inline `patch`,
                       one object per patch, target taken from the patch's
                       kind and metadata.name (or an explicit target kind/name)

Generated ConfigMaps and Secrets get kustomize's content-hash suffix (same
algorithm, so names match `kubectl kustomize`), and references to them from
pod templates (env, envFrom, volumes, imagePullSecrets) are rewritten.

Usage: render_kustomize.py DIR        prints the rendered objects as YAML
       import render_kustomize; render_kustomize.render(DIR) -> [dict, ...]
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import sys
from typing import Any

import yaml


class KustomizeError(Exception):
    pass


SUPPORTED_FIELDS = {
    "apiVersion", "kind", "namespace", "resources", "labels", "images", "replicas",
    "configMapGenerator", "secretGenerator", "generatorOptions", "patches",
}

CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "StorageClass", "PersistentVolume", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
    "CSIDriver", "VolumeSnapshotClass",
}

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

# Strategic-merge keys of the lists infra/k8s patches; other lists are replaced
# (the strategic-merge default for lists without a merge key).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}

# kubectl kustomize's default ("legacy") output order.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition",
    "ServiceAccount", "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding",
    "ClusterRoleBinding", "ConfigMap", "Secret", "Endpoints", "Service", "LimitRange",
    "PriorityClass", "PersistentVolume", "PersistentVolumeClaim", "Deployment",
    "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class Res:
    """A rendered object plus what kustomize tracks about it."""

    def __init__(self, obj: dict, origin: str, generated: bool = False, hash_suffix: bool = True):
        if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
            raise KustomizeError(f"{origin}: not a Kubernetes object (needs apiVersion and kind)")
        if not (obj.get("metadata") or {}).get("name"):
            raise KustomizeError(f"{origin}: {obj.get('kind')} without metadata.name")
        self.obj = obj
        self.origin = origin
        self.generated = generated
        self.hash_suffix = hash_suffix
        self.orig_name = obj["metadata"]["name"]

    @property
    def kind(self) -> str:
        return self.obj["kind"]


def _load_yaml_docs(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise KustomizeError(f"cannot read {path}: {e}") from e
    except yaml.YAMLError as e:
        raise KustomizeError(f"{path}: invalid YAML: {e}") from e


def _kustomization_file(d: str) -> str:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    raise KustomizeError(f"{d}: no kustomization.yaml")


def _parse_env_file(path: str) -> dict[str, str]:
    data: dict[str, str] = {}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise KustomizeError(f"cannot read {path}: {e}") from e
    for n, raw in enumerate(lines, 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}:{n}: expected KEY=VALUE, got {raw!r}")
        k, v = line.split("=", 1)
        if k in data:
            raise KustomizeError(f"{path}:{n}: duplicate key {k}")
        data[k] = v
    return data


def _parse_literals(items: list[str], where: str) -> dict[str, str]:
    data: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise KustomizeError(f"{where}: literal {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        if k in data:
            raise KustomizeError(f"{where}: duplicate key {k}")
        data[k] = v
    return data


def _go_json(value: Any) -> str:
    """json.Marshal of Go: sorted keys, compact, HTML characters escaped."""
    s = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _kustomize_base64(value: str) -> str:
    """Base64 as kustomize writes Secret data: 70-character lines, each
    followed by a newline, once the encoding reaches 70 characters."""
    enc = base64.b64encode(value.encode("utf-8")).decode("ascii")
    if len(enc) // 70 + 1 == 1:
        return enc
    return "".join(enc[i:i + 70] + "\n" for i in range(0, len(enc), 70))


def name_hash(obj: dict) -> str:
    """kustomize's hash suffix of a ConfigMap or Secret (api/hasher).

    kustomize looks the name up with the single path element "metadata/name",
    which never matches, so the name it hashes is always empty.
    """
    meta_name = ""
    if obj["kind"] == "ConfigMap":
        m: dict[str, Any] = {"kind": "ConfigMap", "name": meta_name, "data": obj.get("data") or {}}
        if obj.get("binaryData"):
            m["binaryData"] = obj["binaryData"]
    elif obj["kind"] == "Secret":
        m = {"kind": "Secret", "type": obj.get("type", ""), "name": meta_name, "data": obj.get("data") or {}}
    else:
        raise KustomizeError(f"no hash for kind {obj['kind']}")
    digest = hashlib.sha256(_go_json(m).encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def smp(base: Any, patch: Any, field: str = "", where: str = "") -> Any:
    """Strategic merge of `patch` into `base` (the subset infra/k8s uses)."""
    if isinstance(patch, dict):
        for k in patch:
            if isinstance(k, str) and k.startswith("$"):
                raise KustomizeError(f"{where}: strategic-merge directive {k} is not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        for k, v in patch.items():
            if v is None:
                base.pop(k, None)
            elif k in base:
                base[k] = smp(base[k], v, k, where)
            else:
                base[k] = copy.deepcopy(v)
        return base
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        # Like kustomize (kyaml): the patch's items first, in the patch's
        # order (merged into the matching base item, if any), then the base
        # items the patch does not name.
        key = MERGE_KEYS[field]
        out = []
        named = set()
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"{where}: items of {field} need the merge key {key}")
            named.add(item[key])
            match = next((b for b in base if isinstance(b, dict) and b.get(key) == item[key]), None)
            out.append(smp(match, item, "", where) if match is not None else copy.deepcopy(item))
        out.extend(b for b in base if not (isinstance(b, dict) and b.get(key) in named))
        return out
    return copy.deepcopy(patch)


def _pod_specs(obj: dict) -> list[dict]:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind in WORKLOADS:
        return [((spec.get("template") or {}).get("spec")) or {}]
    if kind == "CronJob":
        return [(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}]
    if kind == "Pod":
        return [spec]
    return []


def _containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers") or []) + list(pod_spec.get("initContainers") or [])


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def _generate(gen: dict, kind: str, d: str, options: dict, namespace: str | None) -> tuple[Res, str]:
    where = f"{d}: {kind} generator {gen.get('name')!r}"
    allowed = {"name", "behavior", "literals", "envs", "type", "options"}
    if kind == "ConfigMap":
        allowed -= {"type"}
    unknown = set(gen) - allowed
    if unknown:
        raise KustomizeError(f"{where}: unsupported fields {sorted(unknown)}")
    if not gen.get("name"):
        raise KustomizeError(f"{where}: no name")
    data: dict[str, str] = {}
    for env in gen.get("envs") or []:
        for k, v in _parse_env_file(os.path.join(d, env)).items():
            if k in data:
                raise KustomizeError(f"{where}: duplicate key {k}")
            data[k] = v
    for k, v in _parse_literals(gen.get("literals"), where).items():
        if k in data:
            raise KustomizeError(f"{where}: duplicate key {k}")
        data[k] = v
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if namespace:
        obj["metadata"]["namespace"] = namespace
    if kind == "Secret":
        obj["type"] = gen.get("type", "Opaque")
        obj["data"] = {k: _kustomize_base64(v) for k, v in data.items()}
    else:
        obj["data"] = data
    opts = dict(options or {})
    opts.update(gen.get("options") or {})
    unknown = set(opts) - {"disableNameSuffixHash"}
    if unknown:
        raise KustomizeError(f"{where}: unsupported options {sorted(unknown)}")
    behavior = gen.get("behavior", "create")
    if behavior not in ("create", "merge", "replace"):
        raise KustomizeError(f"{where}: unknown behavior {behavior}")
    return Res(obj, where, generated=True, hash_suffix=not opts.get("disableNameSuffixHash", False)), behavior


def _find(resources: list[Res], kind: str, name: str, where: str) -> list[Res]:
    found = [r for r in resources if r.kind == kind and r.orig_name == name]
    if not found:
        raise KustomizeError(f"{where}: no {kind} named {name!r} to apply to")
    return found


def build(d: str) -> list[Res]:
    d = os.path.normpath(d)
    kpath = _kustomization_file(d)
    docs = _load_yaml_docs(kpath)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise KustomizeError(f"{kpath}: expected one mapping")
    k = docs[0]
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kpath}: fields not supported by render_kustomize.py: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kpath}: kind must be Kustomization")

    resources: list[Res] = []
    for entry in k.get("resources") or []:
        p = os.path.join(d, entry)
        if os.path.isdir(p):
            resources.extend(build(p))
        elif os.path.isfile(p):
            for i, obj in enumerate(_load_yaml_docs(p)):
                resources.append(Res(obj, f"{p}#{i}"))
        else:
            raise KustomizeError(f"{kpath}: resource {entry!r} does not exist")

    namespace = k.get("namespace")
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(field) or []:
            res, behavior = _generate(gen, kind, d, k.get("generatorOptions") or {}, namespace)
            existing = [r for r in resources if r.kind == kind and r.orig_name == res.orig_name]
            if behavior == "create":
                if existing:
                    raise KustomizeError(f"{res.origin}: {kind} {res.orig_name} already exists (use behavior merge)")
                resources.append(res)
            else:
                if len(existing) != 1 or not existing[0].generated:
                    raise KustomizeError(f"{res.origin}: behavior {behavior} needs one generated {kind} {res.orig_name} in the resources")
                target = existing[0]
                if behavior == "replace":
                    target.obj["data"] = res.obj["data"]
                else:
                    target.obj.setdefault("data", {}).update(res.obj["data"])
                if kind == "Secret" and "type" in gen:
                    target.obj["type"] = gen["type"]

    for i, p in enumerate(k.get("patches") or []):
        where = f"{kpath}: patches[{i}]"
        unknown = set(p) - {"path", "patch", "target"}
        if unknown:
            raise KustomizeError(f"{where}: unsupported fields {sorted(unknown)}")
        if "path" in p:
            pdocs = _load_yaml_docs(os.path.join(d, p["path"]))
            where += f" ({p['path']})"
        elif "patch" in p:
            pdocs = [x for x in yaml.safe_load_all(p["patch"]) if x is not None]
        else:
            raise KustomizeError(f"{where}: needs path or patch")
        if len(pdocs) != 1 or not isinstance(pdocs[0], dict):
            raise KustomizeError(f"{where}: one strategic-merge patch object per entry")
        patch = pdocs[0]
        target = p.get("target") or {}
        unknown = set(target) - {"kind", "name"}
        if unknown:
            raise KustomizeError(f"{where}: target fields {sorted(unknown)} not supported")
        kind = target.get("kind") or patch.get("kind")
        name = target.get("name") or (patch.get("metadata") or {}).get("name")
        if not kind or not name:
            raise KustomizeError(f"{where}: cannot tell the target (kind and metadata.name)")
        for r in _find(resources, kind, name, where):
            body = copy.deepcopy(patch)
            if not p.get("target"):
                body.pop("apiVersion", None)
                body.pop("kind", None)
                meta = body.get("metadata") or {}
                meta.pop("name", None)
                meta.pop("namespace", None)
                if not meta:
                    body.pop("metadata", None)
            smp(r.obj, body, "", where)

    for i, rep in enumerate(k.get("replicas") or []):
        where = f"{kpath}: replicas[{i}]"
        if set(rep) - {"name", "count"} or "name" not in rep or not isinstance(rep.get("count"), int):
            raise KustomizeError(f"{where}: needs name and an integer count")
        hits = [r for r in resources if r.kind in ("Deployment", "StatefulSet", "ReplicaSet") and r.orig_name == rep["name"]]
        if not hits:
            raise KustomizeError(f"{where}: no workload named {rep['name']!r}")
        for r in hits:
            r.obj.setdefault("spec", {})["replicas"] = rep["count"]

    for i, img in enumerate(k.get("images") or []):
        where = f"{kpath}: images[{i}]"
        if set(img) - {"name", "newName", "newTag", "digest"} or "name" not in img:
            raise KustomizeError(f"{where}: supported fields are name, newName, newTag, digest")
        used = False
        for r in resources:
            for ps in _pod_specs(r.obj):
                for c in _containers(ps):
                    name, tag, digest = _split_image(c.get("image", ""))
                    if name != img["name"]:
                        continue
                    used = True
                    name = img.get("newName", name)
                    if "newTag" in img:
                        tag, digest = str(img["newTag"]), None
                    if "digest" in img:
                        tag, digest = None, img["digest"]
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        if not used:
            raise KustomizeError(f"{where}: no container uses image {img['name']!r}")

    for i, lab in enumerate(k.get("labels") or []):
        where = f"{kpath}: labels[{i}]"
        if set(lab) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise KustomizeError(f"{where}: supported fields are pairs, includeSelectors, includeTemplates")
        if lab.get("includeSelectors"):
            raise KustomizeError(f"{where}: includeSelectors: true is not supported")
        pairs = {str(a): str(b) for a, b in (lab.get("pairs") or {}).items()}
        for r in resources:
            r.obj["metadata"].setdefault("labels", {}).update(pairs)
            if lab.get("includeTemplates") and r.kind in WORKLOADS | {"CronJob"}:
                spec = r.obj.setdefault("spec", {})
                if r.kind == "CronJob":
                    spec = spec.setdefault("jobTemplate", {}).setdefault("spec", {})
                tmeta = spec.setdefault("template", {}).setdefault("metadata", {})
                tmeta.setdefault("labels", {}).update(pairs)

    if namespace:
        for r in resources:
            if r.kind not in CLUSTER_SCOPED:
                r.obj["metadata"]["namespace"] = namespace
    return resources


def _rewrite_refs(obj: dict, names: dict[tuple[str, str], str]) -> None:
    def sub(kind: str, holder: dict, key: str) -> None:
        if isinstance(holder, dict) and holder.get(key) is not None:
            holder[key] = names.get((kind, holder[key]), holder[key])

    for ps in _pod_specs(obj):
        for c in _containers(ps):
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                sub("ConfigMap", vf.get("configMapKeyRef"), "name")
                sub("Secret", vf.get("secretKeyRef"), "name")
            for e in c.get("envFrom") or []:
                sub("ConfigMap", e.get("configMapRef"), "name")
                sub("Secret", e.get("secretRef"), "name")
        for v in ps.get("volumes") or []:
            sub("ConfigMap", v.get("configMap"), "name")
            sub("Secret", v.get("secret"), "secretName")
            for src in (v.get("projected") or {}).get("sources") or []:
                sub("ConfigMap", src.get("configMap"), "name")
                sub("Secret", src.get("secret"), "name")
        for s in ps.get("imagePullSecrets") or []:
            sub("Secret", s, "name")


def _order_key(obj: dict) -> tuple:
    kind = obj["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = obj["metadata"]
    return (rank, obj["apiVersion"] if rank == len(ORDER_FIRST) else "", kind,
            meta.get("namespace", ""), meta["name"])


def render(d: str) -> list[dict]:
    resources = build(d)
    names: dict[tuple[str, str], str] = {}
    for r in resources:
        if r.generated and r.hash_suffix:
            new = f"{r.orig_name}-{name_hash(r.obj)}"
            names[(r.kind, r.orig_name)] = new
            r.obj["metadata"]["name"] = new
    for r in resources:
        _rewrite_refs(r.obj, names)
    seen: set[tuple] = set()
    for r in resources:
        key = (r.obj["apiVersion"].split("/")[0] if "/" in r.obj["apiVersion"] else "", r.kind,
               r.obj["metadata"].get("namespace", ""), r.obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{r.origin}: duplicate object {key}")
        seen.add(key)
    return sorted((r.obj for r in resources), key=_order_key)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    try:
        objs = render(argv[1])
    except KustomizeError as e:
        print(f"render_kustomize: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
