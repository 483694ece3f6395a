"""A stand-in Hugging Face Hub on loopback for upload tests (no network here).

It implements the part of the Hub HTTP API that huggingface_hub 2.x calls for
`create_repo`, `create_branch` and `upload_folder` of small files (which go as "regular" base64 blobs
inside the NDJSON commit, never through LFS / Xet), keeps the repos in memory and records every
request (method, URL, headers, body), so tests can assert what arrived and where the token went.
`fail(route, status, times)` makes the next call(s) of a route answer an error.

Starlette + uvicorn in a daemon thread, bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def git_blob_oid(content: bytes) -> str:
    """The git object id the Hub reports for a regular file (what huggingface_hub compares against)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Recorded:
    method: str
    url: str
    route: str
    headers: dict
    body: bytes


@dataclass
class StubHub:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    repos: dict = field(default_factory=dict)  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}, "commits": [...]}
    failures: dict = field(default_factory=dict)  # route -> [status, times left]

    def fail(self, route: str, status: int = 500, times: int = 1) -> None:
        self.failures[route] = [status, times]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def calls(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]


def make_app(hub: StubHub) -> Starlette:
    def route(name):
        def deco(fn):
            async def endpoint(request: Request):
                body = await request.body()
                hub.requests.append(Recorded(request.method, str(request.url), name, dict(request.headers), body))
                failure = hub.failures.get(name)
                if failure and failure[1] > 0:
                    failure[1] -= 1
                    return JSONResponse({"error": f"stub: injected failure of {name}"}, status_code=failure[0])
                return await fn(request, body)

            return endpoint

        return deco

    def repo_id(request: Request) -> str:
        return f"{request.path_params['ns']}/{request.path_params['name']}"

    @route("create_repo")
    async def create_repo(request: Request, body: bytes):
        p = json.loads(body)
        rid = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
        if rid in hub.repos:
            # the Hub names the existing repo in its 409, and huggingface_hub reads that url
            return JSONResponse({"error": "You already created this model repo", "url": f"{hub.url}/{rid}"}, status_code=409)
        hub.repos[rid] = {"private": p.get("visibility") == "private", "branches": {"main": {}}, "commits": []}
        return JSONResponse({"url": f"{hub.url}/{rid}", "name": rid, "id": rid})

    @route("validate_yaml")
    async def validate_yaml(request: Request, body: bytes):
        from huggingface_hub import ModelCardData

        content = json.loads(body)["content"]
        try:
            header = content.split("---\n")[1] if content.startswith("---\n") else ""
            ModelCardData(**(yaml.safe_load(header) or {}))
        except Exception as e:  # what the Hub answers for invalid metadata
            return JSONResponse({"errors": [{"message": str(e)}]}, status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    @route("create_branch")
    async def create_branch(request: Request, body: bytes):
        repo = hub.repos.get(repo_id(request))
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        branch = request.path_params["branch"]
        if branch in repo["branches"]:
            return JSONResponse({"error": "Reference already exists"}, status_code=409)
        repo["branches"][branch] = dict(repo["branches"]["main"])
        return JSONResponse({})

    @route("preupload")
    async def preupload(request: Request, body: bytes):
        repo = hub.repos.get(repo_id(request))
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        existing = repo["branches"].get(request.path_params["revision"], {})
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in json.loads(body)["files"]
        ]
        return JSONResponse({"files": files})

    @route("commit")
    async def commit(request: Request, body: bytes):
        repo = hub.repos.get(repo_id(request))
        revision = request.path_params["revision"]
        if repo is None or revision not in repo["branches"]:
            return JSONResponse({"error": "Repository or revision not found"}, status_code=404)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        tree = dict(repo["branches"][revision])
        for item in lines[1:]:
            if item["key"] == "file":
                tree[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                tree.pop(item["value"]["path"], None)
            else:
                return JSONResponse({"error": f"stub: unsupported commit item {item['key']}"}, status_code=400)
        repo["branches"][revision] = tree
        oid = hashlib.sha1(f"{len(repo['commits'])}{header['summary']}".encode()).hexdigest()
        repo["commits"].append({"oid": oid, "revision": revision, "summary": header["summary"], "files": len(lines) - 1})
        return JSONResponse({"commitUrl": f"{hub.url}/{repo_id(request)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    @route("repo_info")
    async def repo_info(request: Request, body: bytes):
        repo = hub.repos.get(repo_id(request))
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        revision = request.path_params["revision"]
        sha = next((c["oid"] for c in reversed(repo["commits"]) if c["revision"] == revision), "0" * 40)
        siblings = [{"rfilename": p} for p in repo["branches"].get(revision, {})]
        return JSONResponse({"id": repo_id(request), "sha": sha, "private": repo["private"], "siblings": siblings})

    @route("unhandled")
    async def unhandled(request: Request, body: bytes):
        return JSONResponse({"error": f"stub: {request.method} {request.url.path} is not implemented"}, status_code=404)

    return Starlette(
        routes=[
            Route("/api/repos/create", create_repo, methods=["POST"]),
            Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
            Route("/api/models/{ns}/{name}/branch/{branch:path}", create_branch, methods=["POST"]),
            Route("/api/models/{ns}/{name}/preupload/{revision:path}", preupload, methods=["POST"]),
            Route("/api/models/{ns}/{name}/commit/{revision:path}", commit, methods=["POST"]),
            Route("/api/models/{ns}/{name}/revision/{revision:path}", repo_info, methods=["GET"]),
            Route("/{rest:path}", unhandled, methods=["GET", "POST", "PUT", "DELETE", "HEAD"]),
        ]
    )


class running_stub:
    """Context manager: a StubHub served on 127.0.0.1 (free port) for the duration of the block."""

    def __enter__(self) -> StubHub:
        import uvicorn

        self.hub = StubHub()
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.hub), host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("stub Hub did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.hub.url = f"http://127.0.0.1:{port}"
        return self.hub

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
