"""The one typed settings object, read from ``IMX_`` environment variables and an optional file.

Built once at start (``Settings.load()``) and passed down; nothing below reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    """Every setting of the service. Each field is the environment variable ``IMX_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="IMX_", extra="ignore")

    data_dir: Path = Field(Path("./var"), description="Folder for the filesystem store, SQLite index, keys, spool and temporary files.")
    host: str = Field("127.0.0.1", description="Address the DICOM node and the HTTP app bind to.")
    ae_title: str = Field("IMX", description="The node's own AE title; associations must call it.")
    dicom_port: int = Field(11112, description="DICOM (DIMSE) port.")
    http_port: int = Field(8000, description="HTTP port (health, metrics, API).")
    dicom_workers: int = Field(0, description="DICOM receiver processes sharing the port; 0 means one per CPU core.")
    max_pdu: int = Field(262144, description="Maximum PDU length the node receives.")
    max_associations: int = Field(32, description="Concurrent associations per receiver process.")
    network_timeout: float = Field(60.0, description="Seconds of silence after which an association is dropped.")

    database_url: str | None = Field(None, description="SQLAlchemy URL of the index; default SQLite in the data folder. Use postgresql+psycopg://... in production.")

    s3_endpoint: str | None = Field(None, description="host:port of an S3-compatible store; when set, objects go there instead of the filesystem.")
    s3_access_key: str | None = Field(None, description="S3 access key.")
    s3_secret_key: str | None = Field(None, description="S3 secret key.")
    s3_bucket: str = Field("imaging-exchange", description="S3 bucket (created when missing).")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str | None = Field(None, description="S3 region, if the store needs one.")
    store_timeout: float = Field(10.0, description="Seconds an object-store call may take before the instance goes to the local spool.")

    spool_retry_seconds: float = Field(5.0, description="How often the spool drainer retries an unreachable object store.")
    shutdown_grace_seconds: float = Field(60.0, description="On SIGTERM, how long in-flight associations may take to finish.")
    demo: bool = Field(True, description="Create the demo partner DEMOPACS at first start.")
    log_level: str = Field("INFO", description="Log level of the service's own (PHI-free, JSON) log.")
    metrics_public: bool = Field(True, description="Serve /metrics without authentication.")

    policy_file: Path | None = Field(None, description="The operator's default de-identification policy (TOML or JSON: options, burned_in); partners without their own use it. Unset: Basic Profile with Retain Patient Characteristics, Modified Dates, Clean Descriptors, Clean Structured Content and Clean Graphics; burned-in objects quarantined.")
    burnin_rules_file: Path | None = Field(None, description="Extra burned-in text region rules (same format as imaging/data/burnin_regions.json); they win over the packaged ones.")
    safe_private_file: Path | None = Field(None, description="Extra safe private attributes for Retain Safe Private (same format as imaging/data/safe_private.json).")
    vocabulary_file: Path | None = Field(None, description="Extra safe words for the cleaning options, one per line (added to imaging/data/safe_words.txt).")
    preview_workers: int = Field(1, description="Render worker processes for thumbnails, previews and rendered frames.")
    preview_memory_mb: int = Field(1024, description="Address-space limit of each render worker in MiB (RLIMIT_AS); a render beyond it fails and the worker is replaced. 0: no limit.")
    preview_timeout: float = Field(20.0, description="Seconds one render may take before its worker is killed and replaced (the object is then marked unrenderable).")
    preview_size: int = Field(512, description="Kept previews are fitted into this many pixels (width and height).")
    thumbnail_size: int = Field(128, description="Series thumbnails are fitted into this many pixels (width and height).")
    stow_max_bytes: int = Field(2 * 1024**3, description="Largest STOW-RS request body in bytes; a larger one is refused (413) before it fills the disk.")

    @field_validator("ae_title")
    @classmethod
    def _valid_ae(cls, v: str) -> str:
        v = v.strip()
        if not v or len(v) > 16 or "\\" in v or not v.isprintable():
            raise ValueError("IMX_AE_TITLE must be 1 to 16 printable characters without backslash")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("IMX_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        s = cls(**overrides)
        s.data_dir = s.data_dir.expanduser().resolve()
        return s

    # Derived locations: all inside the data folder.
    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "secret.key"

    @property
    def vault_key_file(self) -> Path:
        return self.data_dir / "vault.key"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'index.sqlite3'}"

    @property
    def effective_workers(self) -> int:
        return self.dicom_workers if self.dicom_workers > 0 else max(1, os.cpu_count() or 1)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting: the README's table is made from this."""
        rows = []
        for name, field in type(self).model_fields.items():
            default = field.default
            rows.append((f"IMX_{name.upper()}", "" if default is None else str(default), field.description or ""))
        return rows


def ensure_layout(settings: Settings) -> None:
    """Create the data folder and its private sub-folders (mode 0700)."""
    for d in (settings.data_dir, settings.spool_dir, settings.tmp_dir, settings.run_dir):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
