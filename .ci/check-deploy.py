#!/usr/bin/env python3
"""Checks deploy/: every Kubernetes manifest against the Kubernetes schemas
(kubernetes-validate, strict, oldest and newest supported versions), then what
no schema sees: that the manifests, sluice's configuration in the ConfigMap and
the Dockerfile agree with each other.

Usage: check-deploy.py [TOML_OUT]  (TOML_OUT: where to write the ConfigMap's
sluice.toml, for `sluice --check`)."""

import re
import sys
import tomllib
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The sleep lifecycle action needs 1.30; the newest is what the tool bundles.
KUBERNETES_VERSIONS = ["1.30.0", kv.latest_version()]
# Custom resources: no schema ships with Kubernetes; cross-checked below.
CRD_GROUPS = {"monitoring.coreos.com"}

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def seconds(duration):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    check(match, f"cannot read duration {duration!r}")
    if not match:
        return 0.0
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return int(match.group(1)) * scale


def port_of(address):
    return int(address.rsplit(":", 1)[1])


# Schemas.
kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
files = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
check(sorted(kustomization["resources"]) == files,
      f"kustomization.yaml resources {sorted(kustomization['resources'])} != manifests {files}")
objects = {}
for name in files:
    for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
        objects[doc["kind"]] = doc
        group = doc["apiVersion"].rsplit("/", 1)[0] if "/" in doc["apiVersion"] else ""
        for version in KUBERNETES_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
                print(f"ok      {name}: {doc['kind']} against Kubernetes {version}")
            except kv.SchemaNotFoundError:
                if group in CRD_GROUPS:
                    print(f"skipped {name}: {doc['apiVersion']} {doc['kind']} is a custom resource;"
                          " no schema ships with Kubernetes (cross-checked below)")
                    break
                check(False, f"{name}: no schema for {doc['apiVersion']} {doc['kind']}")
            except kv.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                check(False, f"{name}: {doc['kind']} invalid for Kubernetes {version}: {path}: {err.message}")

# Cross-checks.
deployment = objects["Deployment"]
pod = deployment["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
for kind, selector in [
    ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
    ("Service", objects["Service"]["spec"]["selector"]),
    ("PodDisruptionBudget", objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
    ("PodMonitor", objects["PodMonitor"]["spec"]["selector"]["matchLabels"]),
]:
    check(selector.items() <= pod_labels.items(), f"{kind} selector {selector} misses the pods {pod_labels}")

(container,) = pod["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(objects["Service"]["spec"]["ports"][0]["targetPort"] in ports, "Service targetPort is not a container port")
for endpoint in objects["PodMonitor"]["spec"]["podMetricsEndpoints"]:
    check(endpoint["port"] == "admin" and endpoint["path"] == "/metrics", "PodMonitor must scrape admin /metrics")
check(container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, "readiness must be GET /readyz on admin")
check(container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, "liveness must be GET /healthz on admin")

security = container["securityContext"]
check(pod["spec"]["securityContext"].get("runAsNonRoot") is True, "runAsNonRoot must be true")
check(pod["spec"]["securityContext"].get("seccompProfile") == {"type": "RuntimeDefault"}, "seccomp must be RuntimeDefault")
check(security.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
check(security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
check(security.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")

# The ConfigMap is mounted as a directory (a subPath mount never sees updates)
# and sluice reads and watches the file in it.
(mount,) = container["volumeMounts"]
(volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
configmap = objects["ConfigMap"]
check(volume["configMap"]["name"] == configmap["metadata"]["name"], "the volume does not mount the ConfigMap")
check("subPath" not in mount, "a subPath mount never receives ConfigMap updates")
(key,) = configmap["data"]
check(f"--config={mount['mountPath']}/{key}" in container["args"], "--config does not name the mounted file")
check(any(a.startswith("--watch-config=") for a in container["args"]), "--watch-config is not set")

toml_text = configmap["data"][key]
config = tomllib.loads(toml_text)
check(port_of(config["admin"]["bind"]) == ports["admin"], "[admin] bind port != the admin container port")
for listener in config["listener"]:
    check(port_of(listener["bind"]) in ports.values(), f"listener {listener['name']} port is not a container port")
for address in [config["admin"]["bind"]] + [l["bind"] for l in config["listener"]]:
    check(address.startswith("0.0.0.0:"), f"{address}: the kubelet and the Service reach the pod IP, not loopback")
grace = pod["spec"]["terminationGracePeriodSeconds"]
pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
drain = seconds(config.get("shutdown_timeout", "30s"))
check(pre_stop + drain < grace,
      f"preStop {pre_stop}s + shutdown_timeout {drain}s must be below terminationGracePeriodSeconds {grace}")

dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
check("cargo build --release --locked" in dockerfile, "the Dockerfile must run the build CI runs")
check(re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.M), "the Dockerfile must set STOPSIGNAL SIGTERM")
user = re.search(r"^USER (\d+)", dockerfile, re.M)
check(user and int(user.group(1)) == pod["spec"]["securityContext"]["runAsUser"], "USER != runAsUser")
exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
check(set(ports.values()) <= exposed, f"container ports {sorted(ports.values())} not all EXPOSEd")

if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(toml_text)

for failure in failures:
    print(f"FAILED  {failure}")
print(f"deploy: {len(failures)} problem(s)")
sys.exit(1 if failures else 0)
