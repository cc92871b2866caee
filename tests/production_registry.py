"""The production registry on loopback for tests/test_production_registry.py: PostgreSQL (a throwaway cluster
run as an unprivileged user), moto's S3 server, and `mlflow server` on both in one of two modes:

- `proxied`: `--serve-artifacts` to s3://BUCKET/proxied; versions live at `mlflow-artifacts:` URIs and the model
  server needs no object-store credentials (the tracking server has them);
- `direct`: `--no-serve-artifacts`, artifacts at s3://BUCKET/direct; the model server (and its verifier) read
  them from S3 with their own credentials, from mounted files (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE)
  and MLFLOW_S3_ENDPOINT_URL.

The monitor stays metadata-only: it gets no object-store credentials in either mode. Every secret (the database
password, the S3 secret key, the MLflow tracking password that server and monitor send) is random per module,
so a test can look for it in logs, metrics, status and error messages.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabserve_demo.processes import MlflowServer
from tabserve_demo.registration import artifact_location
from tabserve_demo.stores import S3_REGION, PostgresCluster, S3Store
from tests.support import MODEL_NAME, required_command, wait_for

BUCKET = "models"
MODES = ("proxied", "direct")


@dataclass(frozen=True)
class Secrets:
    database_password: str = field(default_factory=lambda: f"pg-{secrets.token_hex(12)}")
    s3_secret_key: str = field(default_factory=lambda: f"s3-{secrets.token_hex(16)}")
    tracking_password: str = field(default_factory=lambda: f"mlflow-{secrets.token_hex(12)}")

    def values(self) -> dict[str, str]:
        return {"database password": self.database_password, "S3 secret key": self.s3_secret_key,
                "MLflow tracking password": self.tracking_password}


@dataclass
class Stores:
    database: PostgresCluster
    objects: S3Store
    secrets: Secrets

    def close(self) -> None:
        self.objects.stop()
        self.database.remove()


def postgres_bin_dir() -> Path:
    """Where Debian's PostgreSQL server binaries are (installed first when missing)."""
    # Debian puts them in /usr/lib/postgresql/<version>/bin, off PATH; initdb finds postgres beside itself.
    initdb = required_command("initdb", "postgresql", also_in=("/usr/lib/postgresql/*/bin",))
    return Path(os.path.realpath(initdb)).parent


def start_stores(root: Path) -> Stores:
    """PostgreSQL and the S3 store started and healthy, with the bucket created."""
    given = Secrets()
    database = PostgresCluster(postgres_bin_dir(), given.database_password)
    objects = S3Store(root / "moto.log", f"AKIA{secrets.token_hex(8).upper()}", given.s3_secret_key)
    stores = Stores(database, objects, given)
    try:
        database.start()
        objects.start()
        database.wait_healthy(120)
        objects.wait_healthy(120)
        objects.create_bucket(BUCKET)
    except BaseException:
        stores.close()
        raise
    return stores


@dataclass
class Topology:
    """One `mlflow server` on the shared stores, in `mode`, and what a model server needs to use it."""

    mode: str
    stores: Stores
    tracking: MlflowServer
    root: Path
    _copies: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        return self.tracking.url

    def server_env(self) -> dict[str, str]:
        """The model server's environment: the tracking credentials, and in direct mode the object store's,
        from files (as from a mounted Secret)."""
        env = self.monitor_env()
        if self.mode == "direct":
            store = self.stores.objects
            credentials, config = self.root / "aws-credentials", self.root / "aws-config"
            credentials.write_text(f"[default]\naws_access_key_id = {store.access_key}\n"
                                   f"aws_secret_access_key = {store.secret_key}\n")
            config.write_text(f"[default]\nregion = {S3_REGION}\n")
            env.update({"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(config),
                        "MLFLOW_S3_ENDPOINT_URL": store.url})
        return env

    def monitor_env(self) -> dict[str, str]:
        """Metadata only: the tracking server's basic-auth credentials (sent, not checked by this server)."""
        password = self.stores.secrets.tracking_password
        return {"MLFLOW_TRACKING_USERNAME": "tabserve", "MLFLOW_TRACKING_PASSWORD": password}

    @contextlib.contextmanager
    def as_data_scientist(self) -> Iterator[Any]:
        """An MLflow client of this registry; in direct mode this process writes to S3 itself, so the store's
        credentials are in our environment for the duration (never while a child process starts)."""
        from mlflow import MlflowClient

        added = self.stores.objects.client_env() if self.mode == "direct" else {}
        saved = {key: os.environ.get(key) for key in added}
        os.environ.update(added)
        try:
            yield MlflowClient(self.url, self.url)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def promote(self, version: str) -> None:
        with self.as_data_scientist() as client:
            client.set_registered_model_alias(MODEL_NAME, "production", version)

    def key_prefix(self, uri: str) -> str:
        """The S3 key prefix behind an artifact URI of this mode."""
        path = urllib.parse.urlsplit(uri).path.strip("/")
        if self.mode == "direct":
            assert uri.startswith(f"s3://{BUCKET}/"), uri
            return path
        assert uri.startswith("mlflow-artifacts:"), uri
        return f"proxied/{path}"

    def model_file_key(self, version: str) -> str:
        with self.as_data_scientist() as client:
            prefix = self.key_prefix(artifact_location(client, MODEL_NAME, version))
        keys = [key for key in self.stores.objects.snapshot(BUCKET) if key.startswith(prefix + "/")]
        return next(key for key in keys if key.endswith("/model.lgb"))

    def copy_version(self, version: str, model_file: str = "keep") -> str:
        """A new version of MODEL_NAME with a copy of `version`'s files and tags at a new place in S3; its
        model.lgb kept, `deleted` or `truncated` (half of it). Cheap: nothing is trained or logged."""
        store = self.stores.objects
        with self.as_data_scientist() as client:
            source = client.get_model_version(MODEL_NAME, version)
            prefix = self.key_prefix(artifact_location(client, MODEL_NAME, version))
            # Under the run's artifacts: the registry accepts a source there for a version of that run.
            uri = f"{client.get_run(source.run_id).info.artifact_uri}/copies/{next(self._copies)}"
            target = self.key_prefix(uri)
            s3 = store.client()
            for key, content in store.snapshot(BUCKET).items():
                if not key.startswith(prefix + "/"):
                    continue
                body = content
                if key.endswith("/model.lgb") and model_file != "keep":
                    if model_file == "deleted":
                        continue
                    body = content[: len(content) // 2]
                s3.put_object(Bucket=BUCKET, Key=f"{target}/{key[len(prefix) + 1:]}", Body=body)
            created = client.create_model_version(MODEL_NAME, uri, run_id=source.run_id, tags=dict(source.tags))
            new = str(created.version)
            wait_for(lambda: client.get_model_version(MODEL_NAME, new).status == "READY", timeout=60,
                     what=f"version {new} READY")
        return new


def start_topology(mode: str, stores: Stores, root: Path) -> Topology:
    """`mlflow server` in `mode` on its own database of the shared cluster, healthy; version 1 of the demo model
    registered through it under alias `production`."""
    from tabserve_demo.registration import register_demo_version

    database = stores.database.create_database(f"mlflow_{mode}")
    store_env = stores.objects.client_env()
    if mode == "proxied":
        tracking = MlflowServer(database, f"s3://{BUCKET}/proxied", root / "mlflow-server.log", env=store_env)
    else:
        tracking = MlflowServer(database, f"s3://{BUCKET}/direct", root / "mlflow-server.log", env=store_env,
                                serve_artifacts=False)
    topology = Topology(mode, stores, tracking.start(), root)
    try:
        tracking.wait_healthy()
        started = time.monotonic()
        with topology.as_data_scientist():
            version = register_demo_version(tracking.url, MODEL_NAME, seed=1)
        print(f"{mode}: version {version} registered through the tracking server in "
              f"{time.monotonic() - started:.1f}s")
        assert version == "1"
    except BaseException:
        tracking.stop()
        raise
    return topology
