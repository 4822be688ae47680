#!/usr/bin/env python3
"""A stand-in Kubernetes API server for scripts/check_chart.sh, so that the chart's `lookup`
checks (the model's claim, etcd's claim templates) can be proved offline with
`helm template --dry-run=server`: it answers API discovery for the kinds the chart renders and
GET/LIST of the objects given in a JSON file, and nothing else (404 with a Status body, as the
real server). Requests are logged to stderr.

Usage: chart_lookup_server.py OBJECTS.json PORT-FILE
  OBJECTS.json  a JSON list of Kubernetes objects (apiVersion, kind, metadata.name/namespace)
  PORT-FILE     written with the port once listening (127.0.0.1, an ephemeral port)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# group/version -> (kind, plural, namespaced) served: what the chart renders and looks up.
RESOURCES = {
    "v1": [("Service", "services", True), ("ServiceAccount", "serviceaccounts", True),
           ("PersistentVolumeClaim", "persistentvolumeclaims", True), ("Secret", "secrets", True),
           ("ConfigMap", "configmaps", True), ("Pod", "pods", True), ("Namespace", "namespaces", False)],
    "apps/v1": [("Deployment", "deployments", True), ("StatefulSet", "statefulsets", True)],
    "batch/v1": [("Job", "jobs", True)],
    "policy/v1": [("PodDisruptionBudget", "poddisruptionbudgets", True)],
}


def resource_list(group_version):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                           "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}
                          for kind, plural, namespaced in RESOURCES[group_version]]}


def group_list():
    groups = [gv.split("/") for gv in RESOURCES if "/" in gv]
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}


def not_found(what):
    return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"{what} not found",
                 "reason": "NotFound", "code": 404}


def make_handler(objects):
    def answer(path):
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, group_list()
        parts = path.strip("/").split("/")
        # /api/v1/... or /apis/GROUP/VERSION/...
        if parts[0] == "api" and len(parts) >= 2:
            group_version, rest = parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return not_found(path)
        if group_version not in RESOURCES:
            return not_found(path)
        if not rest:
            return 200, resource_list(group_version)
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        kinds = {p: k for k, p, _ in RESOURCES[group_version]}
        if plural not in kinds:
            return not_found(path)
        matching = [o for o in objects if o["apiVersion"] == group_version and o["kind"] == kinds[plural]
                    and (namespace is None or o["metadata"].get("namespace") == namespace)]
        if name is None:
            return 200, {"kind": kinds[plural] + "List", "apiVersion": group_version,
                         "metadata": {"resourceVersion": "1"}, "items": matching}
        for o in matching:
            if o["metadata"]["name"] == name:
                return 200, o
        return not_found(f'{plural} "{name}"')

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code, body = answer(urlparse(self.path).path)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            print(f"[chart_lookup_server] {self.command} {self.path} -> {args[1]}", file=sys.stderr, flush=True)

    return Handler


def main():
    objects_path, port_file = sys.argv[1:3]
    with open(objects_path) as f:
        objects = json.load(f)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(objects))
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
