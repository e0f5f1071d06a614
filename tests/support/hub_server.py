"""A small local Hugging Face Hub for tests: the part of the HTTP API `huggingface_hub` uses to create, push and pull.

The real Hub cannot be reached from CI, and a mock that answers canned responses would not show that a pushed repo
really loads. This server keeps what it receives on disk like git does: file contents are blobs named by their git
blob id (what `huggingface_hub` compares to skip unchanged files), a commit is a JSON document naming its parent,
message and file tree, and its id is the sha1 of that document, so every revision of a repo stays resolvable.

Endpoints (model repos only), with the quirks `huggingface_hub` 2.x and `transformers` rely on:

    POST /api/repos/create                         409 with `url` in the body when the repo exists
    POST /api/models/{ns}/{name}/preupload/{rev}   `uploadMode: "regular"` for every file: contents then come
                                                   base64 inside the commit, so no LFS or Xet transfer
    POST /api/models/{ns}/{name}/commit/{rev}      ndjson: header, file, deletedFile, deletedFolder lines
    POST /api/models/{ns}/{name}/branch/{branch}   409 when the branch exists
    GET  /api/models/{ns}/{name}/refs
    GET  /api/models/{ns}/{name}/commits/{rev}     the history, newest first
    POST /api/validate-yaml                        sent for every README.md upload
    GET  /api/models/{ns}/{name}[/revision/{rev}]  with `sha` and `siblings`
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}     `X-Repo-Commit`, `ETag`, `Content-Length`; errors carry
                                                   `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound)

Writes need a token the server knows (`Authorization: Bearer ...`), as on the Hub; a private repo is invisible
(RepoNotFound) to requests without one. Run it on its own to push and pull by hand:

    python tests/hub_server.py --root /tmp/hub --port 8999 --token hf_local   # then HF_ENDPOINT=http://127.0.0.1:8999
"""

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


COMMIT_ID = re.compile(r"[0-9a-f]{40}")
INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


class HubError(Exception):
    """An HTTP error answer; `code` goes to `X-Error-Code`, which `huggingface_hub` maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One model repo on disk: `objects/` (blobs by git blob id), `commits/` (by commit id), `refs.json`."""

    path: Path
    repo_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refs(self) -> dict:
        return json.loads((self.path / "refs.json").read_text())

    def write_refs(self, refs: dict):
        tmp = self.path / "refs.json.tmp"
        tmp.write_text(json.dumps(refs, indent=1))
        tmp.replace(self.path / "refs.json")

    def resolve(self, revision: str) -> str:
        """Branch name or full commit id -> commit id."""
        branches = self.refs()["branches"]
        if revision in branches:
            return branches[revision]
        if COMMIT_ID.fullmatch(revision) and (self.path / "commits" / f"{revision}.json").exists():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, commit_id: str) -> dict:
        return json.loads((self.path / "commits" / f"{commit_id}.json").read_text())

    def blob(self, blob_id: str) -> bytes:
        return (self.path / "objects" / blob_id).read_bytes()

    def put_blob(self, content: bytes) -> str:
        blob_id = git_blob_id(content)
        target = self.path / "objects" / blob_id
        if not target.exists():
            target.write_bytes(content)
        return blob_id

    def new_commit(self, branch: str, tree: dict[str, str], author: str, message: str, description: str = "") -> str:
        """Write a commit on top of `branch` (created if absent) and move the branch to it. Caller holds the lock."""
        branches = self.refs()["branches"]
        document = {
            "parent": branches.get(branch),
            "author": author,
            "tree": dict(sorted(tree.items())),
            "title": message,
            "message": description,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        encoded = json.dumps(document, sort_keys=True).encode()
        commit_id = hashlib.sha1(encoded).hexdigest()
        (self.path / "commits" / f"{commit_id}.json").write_bytes(encoded)
        refs = self.refs()
        refs["branches"][branch] = commit_id
        self.write_refs(refs)
        return commit_id


class HubStore:
    """Repos under `root/{namespace}/{name}`; `tokens` maps a token to the user it authenticates."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        self.tokens = tokens
        self.create_lock = threading.Lock()

    def repo(self, repo_id: str, user: str | None) -> Repo:
        path = self.root / repo_id
        if not (path / "refs.json").exists():
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        repo = Repo(path, repo_id)
        if repo.refs()["private"] and user is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def create(self, repo_id: str, private: bool) -> Repo:
        with self.create_lock:
            path = self.root / repo_id
            if (path / "refs.json").exists():
                raise HubError(409, "You already created this model repo")
            for sub in ("objects", "commits"):
                (path / sub).mkdir(parents=True, exist_ok=True)
            repo = Repo(path, repo_id)
            repo.write_refs({"branches": {}, "private": private, "created": time.time()})
            # like the Hub, a new repo starts with one commit holding `.gitattributes`
            tree = {name: repo.put_blob(content) for name, content in INITIAL_FILES.items()}
            repo.new_commit("main", tree, "system", "initial commit")
            return repo


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: HubStore  # set on the subclass made by `HubServer`
    log: list  # (method, path, status) of every request, for tests that assert what was (not) asked
    echo: bool = False  # print every request (command-line use)

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def log_message(self, format, *args):  # keep pytest output clean; `log` has the requests
        pass

    def dispatch(self, method: str):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            status = self.route(method, segments)
        except HubError as err:
            status = err.status
            payload = json.dumps({"error": str(err)}).encode()
            headers = {"Content-Type": "application/json", **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = str(err)
            self.answer(err.status, payload, headers, head=method == "HEAD")
        self.log.append((method, url.path, status))
        if self.echo:
            print(f"{method} {url.path} -> {status}", flush=True)

    def answer(self, status: int, body: bytes, headers: dict | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def json(self, payload, status: int = 200) -> int:
        self.answer(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        return status

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.store.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def require_user(self) -> str:
        user = self.user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    def endpoint(self) -> str:
        return f"http://{self.headers.get('Host')}"

    # ---- routes -----------------------------------------------------------------------------------------------

    def route(self, method: str, s: list[str]) -> int:
        if method == "POST" and s[:3] == ["api", "repos", "create"]:
            return self.create_repo()
        if method == "POST" and s[:2] == ["api", "validate-yaml"]:
            return self.validate_yaml()
        if method == "GET" and s[:2] == ["api", "agent-harnesses"]:  # huggingface_hub's user-agent telemetry
            return self.json({"standardEnvVars": [], "harnesses": {}})
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit", "branch"):
                return getattr(self, rest[0])(repo_id, rest[1])
            if method == "GET" and not rest:
                return self.model_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self.model_info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self.tree(repo_id, rest[1], "/".join(rest[2:]))
            if method == "GET" and rest == ["refs"]:
                return self.list_refs(repo_id)
            if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                return self.list_commits(repo_id, rest[1])
        if method in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return self.resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]), head=method == "HEAD")
        raise HubError(404, f"no such endpoint on the local hub: {method} {self.path}")

    def create_repo(self) -> int:
        user = self.require_user()
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "the local hub stores model repos only")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.endpoint()}/{repo_id}"
        try:
            self.store.create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        except HubError as err:
            if err.status == 409:  # huggingface_hub reads `url` from the 409 body when `exist_ok=True`
                return self.json({"error": str(err), "url": url}, 409)
            raise
        return self.json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> int:
        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match is None:
            return self.json({"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return self.json({"errors": [{"message": f"Invalid YAML: {err}"}]}, 400)
        if not isinstance(metadata, dict):
            return self.json({"errors": [{"message": '"value" must be of type object'}]}, 400)
        return self.json({"errors": [], "warnings": []})

    def preupload(self, repo_id: str, revision: str) -> int:
        self.require_user()
        repo = self.store.repo(repo_id, self.user())
        tree = repo.commit(repo.resolve(revision))["tree"]
        files = [
            # `oid` lets huggingface_hub drop files whose content is already there from the commit
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in json.loads(self.body)["files"]
        ]
        return self.json({"files": files, "commitOid": repo.resolve(revision)})

    def commit(self, repo_id: str, revision: str) -> int:
        self.require_user()
        if self.query.get("create_pr"):
            raise HubError(400, "the local hub does not do pull requests")
        repo = self.store.repo(repo_id, self.user())
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        with repo.lock:
            if revision not in repo.refs()["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}: commits go to a branch", "RevisionNotFound")
            head = repo.resolve(revision)
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, f"A commit has happened since. Please refresh and try again. (head is {head})")
            tree = dict(repo.commit(head)["tree"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"{path}: only base64 file contents are accepted")
                    tree[path] = repo.put_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    tree = {p: b for p, b in tree.items() if not p.startswith(prefix)}
                else:  # lfsFile: preupload never asks for LFS, so a client sending one is out of step
                    raise HubError(400, f"{path}: '{key}' operations are not supported by the local hub")
            commit_id = repo.new_commit(revision, tree, self.user(), header.get("summary", ""),
                                        header.get("description", ""))
        return self.json({
            "success": True,
            "commitOid": commit_id,
            "commitUrl": f"{self.endpoint()}/{repo_id}/commit/{commit_id}",
            "hookOutput": "",
        })

    def branch(self, repo_id: str, branch: str) -> int:
        self.require_user()
        repo = self.store.repo(repo_id, self.user())
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        with repo.lock:
            refs = repo.refs()
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = repo.resolve(start)
            repo.write_refs(refs)
        return self.json({})

    def list_refs(self, repo_id: str) -> int:
        repo = self.store.repo(repo_id, self.user())
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
            for name, commit in repo.refs()["branches"].items()
        ]
        return self.json({"branches": branches, "tags": [], "converts": []})

    def list_commits(self, repo_id: str, revision: str) -> int:
        """The history of `revision`, newest first, following parents like `git log`."""
        repo = self.store.repo(repo_id, self.user())
        history, commit_id = [], repo.resolve(revision)
        while commit_id is not None:
            commit = repo.commit(commit_id)
            history.append({"id": commit_id, "authors": [{"user": commit["author"]}], "date": commit["date"],
                            "title": commit["title"], "message": commit["message"]})
            commit_id = commit["parent"]
        return self.json(history)

    def model_info(self, repo_id: str, revision: str) -> int:
        repo = self.store.repo(repo_id, self.user())
        commit_id = repo.resolve(revision)
        commit = repo.commit(commit_id)
        return self.json({
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit_id,
            "private": repo.refs()["private"],
            "lastModified": commit["date"],
            "tags": [],
            "siblings": [{"rfilename": path} for path in commit["tree"]],
        })

    def tree(self, repo_id: str, revision: str, folder: str) -> int:
        repo = self.store.repo(repo_id, self.user())
        tree = repo.commit(repo.resolve(revision))["tree"]
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path, blob_id in tree.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                size = (repo.path / "objects" / blob_id).stat().st_size
                entries.append({"type": "file", "oid": blob_id, "size": size, "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "oid": git_blob_id(p.encode()), "size": 0, "path": p} for p in sorted(folders)]
        return self.json(sorted(entries, key=lambda e: e["path"]))

    def resolve(self, repo_id: str, revision: str, path: str, head: bool) -> int:
        repo = self.store.repo(repo_id, self.user())
        commit_id = repo.resolve(revision)
        blob_id = repo.commit(commit_id)["tree"].get(path)
        if blob_id is None:
            # transformers probes optional files and huggingface_hub caches the miss per commit: both need these
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id})
        content = repo.blob(blob_id)
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{blob_id}"', "Content-Type": "application/octet-stream"}
        status = 200
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and not head:  # huggingface_hub resumes an interrupted download with an open-ended range
            start = int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            content, status = content[start:], 206
        headers["Content-Length"] = str(len(content))
        self.answer(status, content, headers, head=head)
        return status


class HubServer:
    """The local hub on 127.0.0.1 and a free port, served from a background thread; `url` goes to `HF_ENDPOINT`."""

    def __init__(self, root: Path, tokens: dict[str, str], port: int = 0, echo: bool = False):
        self.log: list = []
        handler = type("Handler", (HubHandler,), {"store": HubStore(root, tokens), "log": self.log, "echo": echo})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory that holds the repos")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default="hf_local", help="the token that may write (user --user)")
    parser.add_argument("--user", default="local-user")
    parser.add_argument("--quiet", action="store_true", help="do not print the requests")
    args = parser.parse_args()
    with HubServer(Path(args.root), {args.token: args.user}, args.port, echo=not args.quiet) as server:
        print(f"local hub at {server.url} (repos in {args.root}); HF_ENDPOINT={server.url} HF_TOKEN={args.token}",
              flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
