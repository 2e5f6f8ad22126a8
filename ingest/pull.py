"""The whole ingest stage in one run: PACS → spool → catalog → shards, with Prometheus metrics.

``python -m ingest pull --pacs HOST:PORT --called-aet AET --work DIR`` C-FINDs the studies, plans
what the spool still lacks, retrieves it (C-MOVE into our own Storage SCP, or C-GET), scans the
spool into ``DIR/catalog``, then balances and writes the shards of each ``--granularity`` into
``DIR/shards-<g>``. ``--dicomweb URL`` (instead of ``--pacs``) does the same over DICOMweb:
QIDO-RS searches and WADO-RS retrieval (``ingest.dicomweb``) into the same spool. After the
retrieval ``DIR/ledger.parquet`` records every promised instance and each study's state
(``ingest.ledger``); partial or failed studies are listed and the exit status is 3.
The instance-level searches run over ``--workers`` associations (or HTTP connections), and a
re-run plans the studies its ledger records complete without searching them again.
``--processes P --workers N`` retrieves over P x N associations in P processes (one core
each); ``--no-fsync`` answers each C-STORE before the instance is on disk (faster, not crash-safe:
see ``ingest.dicom.scp``). ``--transport pynetdicom`` receives and retrieves on pynetdicom's own
associations instead of this project's faster DICOM upper layer (same spool): the switch for a
PACS vendor's implementation that does not interoperate with the fast one. Every step is
resumable: a second run retrieves only what is missing, re-reads only changed files and rewrites
only shards whose content changed. Failed retrievals are reported and counted, the rest
of the run goes on, and nothing already stored is lost.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pandas as pd

from ingest import dicomweb
from ingest.dask_runner import add_scheduler_argument, dask_client
from ingest.dataset.balance import BalanceConfig
from ingest.dataset.catalog import CatalogError, id_salt_from_env, read_catalog, scan
from ingest.dataset.shards import (
    ShardError,
    add_shard_arguments,
    balance_config_from_args,
    format_manifest_summary,
    write_shards,
)
from ingest.dataset.taxonomy import Taxonomy, load_taxonomy
from ingest.dicom.scp import (
    DEFAULT_TRANSPORT,
    TRANSPORT_HELP,
    TRANSPORTS,
    StorageSCP,
    check_transport,
    remove_stale_parts,
    setup_cli_logging,
    spooled_uids,
)
from ingest.dicom.scu import (
    PacsConfig,
    PacsError,
    RetrieveSummary,
    echo,
    find_studies,
    plan_retrieval,
    retrieve,
)
from ingest.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, DicomwebConfig, authorization_from
from ingest.files import write_json_atomic
from ingest.imaging.gpu_decode import resolve_gpu_decode
from ingest.imaging.preprocess import PreprocessParams
from ingest.ledger import LEDGER_NAME, build_ledger, completed_studies, incomplete_studies, write_ledger
from ingest.metrics import IngestMetrics
from ingest.polite import Pacer, PullInterrupted, Window

log = logging.getLogger("ingest.pull")

METHODS = ("move", "get")
PLAN_AHEAD = 1000  # studies searched ahead of the retrieval (and what a Ctrl-C may wait to finish)


@dataclass(frozen=True, kw_only=True)
class PullConfig:
    """One pull run from ``pacs`` (DIMSE) or ``dicomweb``; the shard set's granularity is
    ``balance.granularity``."""

    pacs: PacsConfig | None = None
    dicomweb: DicomwebConfig | None = None
    work_dir: Path
    method: str = "move"
    transport: str = DEFAULT_TRANSPORT
    scp_host: str = "127.0.0.1"
    scp_port: int = 11112
    date_from: date | None = None
    date_to: date | None = None
    modalities: tuple[str, ...] = ("CR", "DX")
    page_limit: int | None = None
    workers: int = 4
    processes: int = 1
    studies_per_request: int = 50
    fsync: bool = True
    # Polite pulling (ingest.polite): retrieve only inside this daily window, at most max_rate instances/s.
    window: Window | None = None
    max_rate: float | None = None
    # A re-run plans the studies its ledger records complete from the ledger, without a search.
    requery_complete: bool = False
    # Plan with relational IMAGE-level C-FINDs, many studies per query (ingest.dicom.scu.plan_retrieval).
    relational_find: bool = False
    write_shards: bool = True
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    preprocessing: PreprocessParams = field(default_factory=PreprocessParams)
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if (self.pacs is None) == (self.dicomweb is None):
            raise ValueError("give one source: a PACS (--pacs HOST:PORT) or DICOMweb (--dicomweb URL)")
        if self.relational_find and self.dicomweb is not None:
            raise ValueError("--relational-find plans C-FINDs: use it with --pacs, not --dicomweb")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use 'move' (the PACS pushes to our SCP) or 'get'")
        check_transport(self.transport)
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"--from {self.date_from} is after --to {self.date_to}")
        if not 1 <= self.studies_per_request <= 1000:
            raise ValueError(
                f"studies_per_request={self.studies_per_request}: use 1..1000 (1 = no UID lists)"
            )
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: use 1 or more parallel associations")
        if self.processes < 1:
            raise ValueError(
                f"processes={self.processes}: use 1 (retrieve in this process) or more, up to the cores"
            )
        if self.max_rate is not None and self.max_rate <= 0:
            raise ValueError(f"max_rate={self.max_rate}: instances per second, > 0 (or no limit: None)")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}: use 1 or more samples per shard")
        if not 0 <= self.scp_port < 65536:
            raise ValueError(f"scp_port={self.scp_port}: the port the PACS knows for our AE title, 1..65535")

    @property
    def spool_dir(self) -> Path:
        return self.work_dir / "spool"

    @property
    def catalog_path(self) -> Path:
        return self.work_dir / "catalog"

    @property
    def shards_dir(self) -> Path:
        return self.work_dir / f"shards-{self.balance.granularity}"

    @property
    def ledger_path(self) -> Path:
        return self.work_dir / LEDGER_NAME

    def describe_source(self) -> str:
        return self.pacs.describe() if self.pacs is not None else self.dicomweb.describe()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["work_dir"] = str(self.work_dir)
        d["dicomweb"] = self.dicomweb.to_dict() if self.dicomweb is not None else None  # no credentials
        d["window"] = str(self.window) if self.window is not None else None
        d["balance"] = self.balance.to_dict()
        d["preprocessing"] = self.preprocessing.to_dict()
        return json.loads(json.dumps(d, default=str))


@dataclass
class PullResult:
    studies: int = 0
    planned_instances: int = 0
    retrieval: RetrieveSummary = field(default_factory=RetrieveSummary)
    catalog: dict = field(default_factory=dict)
    manifest: dict | None = None
    # Per study (ingest.ledger.studies) of the partial and failed ones; empty when all are complete.
    incomplete_studies: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def ok(self) -> bool:
        return self.retrieval.ok and self.incomplete_studies.empty


def pull(
    cfg: PullConfig,
    *,
    id_salt: str,
    taxonomy: Taxonomy | None = None,
    metrics: IngestMetrics | None = None,
    scheduler: str | None = None,
    dask_workers: int | None = None,
    progress: bool = True,
    pacer: Pacer | None = None,
) -> PullResult:
    """Run the stage; raises PacsError when the PACS cannot be reached at all.

    ``pacer`` (default: one for ``cfg.window`` and ``cfg.max_rate``) paces the searches and the
    retrieval; a test passes one on a fake clock."""
    taxonomy = taxonomy or load_taxonomy()
    metrics = metrics or IngestMetrics()
    result = PullResult()
    cfg.spool_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.work_dir / "pull-config.json", cfg.to_dict())

    pacer = pacer or Pacer(cfg.window, cfg.max_rate)
    pacer.wait_for_window()  # the searches are load on the PACS too
    metrics.set_stage("find")
    search = {
        "date_range": (cfg.date_from, cfg.date_to),
        "modalities": cfg.modalities,
        "page_limit": cfg.page_limit,
    }
    promised: dict[str, list[dict]] = {}
    if cfg.dicomweb is not None:
        studies = [s["StudyInstanceUID"] for s in dicomweb.find_studies(cfg.dicomweb, **search)]
        plan = functools.partial(dicomweb.plan_retrieval, cfg.dicomweb)
    else:
        echo(cfg.pacs)
        found = list(find_studies(cfg.pacs, **search))
        studies = [s["StudyInstanceUID"] for s in found]
        plan = functools.partial(
            plan_retrieval,
            cfg.pacs,
            relational=cfg.relational_find,
            expected_instances={s["StudyInstanceUID"]: s["NumberOfStudyRelatedInstances"] for s in found},
        )
    remove_stale_parts(cfg.spool_dir)  # once: the chunks' retrievals below leave it alone
    present = spooled_uids(cfg.spool_dir)  # listed once; each chunk's plan leaves these out
    known = {} if cfg.requery_complete else completed_studies(cfg.ledger_path, present)
    promised.update((uid, known[uid]) for uid in studies if uid in known)
    to_search = [uid for uid in studies if uid not in known]
    if promised:
        log.info(
            "%d studies complete in %s: planned from it, not searched again",
            len(promised),
            cfg.ledger_path,
        )
    known_instances = sum(len(instances) for instances in promised.values())
    metrics.on_found(known_instances)
    metrics.on_skipped(known_instances)
    result.studies = len(studies)
    log.info("%d studies on %s, %d to search", len(studies), cfg.describe_source(), len(to_search))
    # Planning is pipelined with retrieval: the next PLAN_AHEAD studies are searched while the
    # retrieval of the ones before runs, so the first retrieval does not wait for a million searches.
    chunks = [to_search[start : start + PLAN_AHEAD] for start in range(0, len(to_search), PLAN_AHEAD)]
    search_options = {"workers": cfg.workers, "promised": promised, "observer": metrics, "present": present}
    planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan-ahead")
    try:
        with _Retriever(cfg, metrics, progress, pacer if pacer.active else None) as retriever:
            ahead = None
            for number, chunk in enumerate(chunks):
                current = ahead or planner.submit(
                    plan, cfg.spool_dir, chunk, progress=progress, **search_options
                )
                if number + 1 < len(chunks):
                    following = chunks[number + 1]
                    ahead = planner.submit(plan, cfg.spool_dir, following, progress=False, **search_options)
                items = current.result()
                metrics.set_stage("retrieve")
                result.planned_instances += sum(len(item.sop_instance_uids) for item in items)
                if items:
                    retriever.fetch(items)
            result.retrieval = retriever.summary
    except BaseException:
        pacer.interrupt()  # Ctrl-C: threads waiting for the window or the rate stop at once
        raise
    finally:
        planner.shutdown(wait=False, cancel_futures=True)
    log.info("%d instances were not yet in the spool", result.planned_instances)
    metrics.on_skipped(result.retrieval.already_present)
    ledger = build_ledger(promised, cfg.spool_dir, result.retrieval.failures)
    write_ledger(ledger, cfg.ledger_path)
    result.incomplete_studies = incomplete_studies(ledger)
    if not result.incomplete_studies.empty:
        log.warning(
            "%d of %d studies incomplete (see %s); run the same pull again to complete them",
            len(result.incomplete_studies),
            len(studies),
            cfg.ledger_path,
        )

    metrics.set_stage("scan")
    # One Dask cluster serves the scan and the shard writing: starting one costs seconds.
    with dask_client(scheduler, dask_workers) as client:
        result.catalog = scan(
            cfg.spool_dir,
            cfg.catalog_path,
            id_salt=id_salt,
            taxonomy=taxonomy,
            scheduler=scheduler,
            client=client,
            progress=progress,
        )
        metrics.record_catalog(
            read_catalog(cfg.catalog_path, columns=["status", "body_part", "label_7", "label_30", "label_68"])
        )
        if cfg.write_shards:
            metrics.set_stage("shards")
            result.manifest = write_shards(
                cfg.catalog_path,
                cfg.shards_dir,
                balance_config=cfg.balance,
                params=cfg.preprocessing,
                shard_size=cfg.shard_size,
                taxonomy=taxonomy,
                id_salt=id_salt,
                scheduler=scheduler,
                client=client,
                progress=progress,
            )
    metrics.set_stage("done")
    return result


class _Retriever:
    """Retrieves plan chunks one after another into the spool, with one Storage SCP for all of a
    C-MOVE pull's chunks (started at the first), and adds up their summaries."""

    def __init__(self, cfg: PullConfig, metrics: IngestMetrics, progress: bool, pacer: Pacer | None) -> None:
        self.cfg, self.metrics, self.progress, self.pacer = cfg, metrics, progress, pacer
        self.summary = RetrieveSummary()
        self._scp: StorageSCP | None = None

    def __enter__(self) -> _Retriever:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._scp is not None:
            self._scp.stop()

    def fetch(self, items) -> None:
        self.summary.add(self._retrieve(items))

    def _retrieve(self, items) -> RetrieveSummary:
        cfg = self.cfg
        common = {
            "progress": self.progress,
            "observer": self.metrics,
            "pacer": self.pacer,
            "clean_spool": False,
        }
        if cfg.dicomweb is not None:
            return dicomweb.retrieve(
                cfg.dicomweb, items, spool_dir=cfg.spool_dir, workers=cfg.workers, fsync=cfg.fsync, **common
            )
        retrieving = {
            "workers": cfg.workers,
            "processes": cfg.processes,
            "max_studies_per_request": cfg.studies_per_request,
            "transport": cfg.transport,
        }
        if cfg.method == "get":
            return retrieve(
                cfg.pacs,
                items,
                method="get",
                spool_dir=cfg.spool_dir,
                fsync=cfg.fsync,
                **retrieving,
                **common,
            )
        if self._scp is None:
            # Only the PACS we query may push to us: anything else is refused and logged by the SCP. With
            # several processes each listens on the same port, and the kernel spreads the PACS's associations.
            self._scp = StorageSCP(
                cfg.spool_dir,
                cfg.pacs.move_destination or cfg.pacs.calling_aet,
                cfg.scp_port,
                [cfg.pacs.called_aet],
                cfg.scp_host,
                share_port=cfg.processes > 1,
                fsync=cfg.fsync,
                transport=cfg.transport,
            )
            self._scp.start()
        return retrieve(cfg.pacs, items, method="move", scp=self._scp, **retrieving, **common)


def format_incomplete(table: pd.DataFrame, ledger_path: Path, shown: int = 20) -> str:
    """The partial and failed studies, a line each (the first ``shown``), for the console."""
    lines = [f"{len(table)} incomplete study(ies) (ledger: {ledger_path}):"]
    for row in table.head(shown).itertuples():
        lines.append(
            f"  {row.study_state:8} {row.study_uid}: {row.stored} of {row.instances} stored, "
            f"{row.refused} refused, {row.missing} missing"
        )
    if len(table) > shown:
        lines.append(f"  ... and {len(table) - shown} more")
    return "\n".join(lines)


def _window_argument(text: str) -> Window:
    try:
        return Window.parse(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ingest pull", description=__doc__.split("\n\n")[0])
    net = parser.add_argument_group("PACS")
    source = net.add_mutually_exclusive_group(required=True)
    source.add_argument("--pacs", metavar="HOST:PORT", help="the PACS DICOM address (DIMSE)")
    source.add_argument(
        "--dicomweb",
        metavar="URL",
        help="a DICOMweb service root instead (QIDO-RS + WADO-RS), e.g. https://pacs.example.org/dicom-web; "
        f"credentials from ${TOKEN_ENV} (bearer) or ${USER_ENV}/${PASSWORD_ENV} (basic), or the files below",
    )
    net.add_argument("--called-aet", help="the PACS's AE title (with --pacs)")
    net.add_argument("--token-file", type=Path, help="DICOMweb: file holding a bearer token")
    net.add_argument("--basic-auth-file", type=Path, help="DICOMweb: file holding one line user:password")
    net.add_argument("--aet", default="PEDXRAY", help="our calling AE title (default PEDXRAY)")
    net.add_argument("--move-dest", help="C-MOVE destination AE title (default: --aet)")
    net.add_argument(
        "--method",
        choices=METHODS,
        default="move",
        help="move: the PACS pushes to our Storage SCP (default); get: over the same association",
    )
    net.add_argument("--transport", choices=TRANSPORTS, default=DEFAULT_TRANSPORT, help=TRANSPORT_HELP)
    net.add_argument(
        "--scp-host",
        default="127.0.0.1",
        help="address our Storage SCP binds (0.0.0.0 to accept a PACS on another machine)",
    )
    net.add_argument("--scp-port", type=int, default=11112, help="port the PACS knows for our AE title")
    net.add_argument(
        "--workers",
        type=int,
        default=4,
        help="parallel associations per retrieving process, or DICOMweb HTTP connections (default 4)",
    )
    net.add_argument(
        "--processes",
        type=int,
        default=1,
        help="retrieving processes, each with --workers associations (default 1; receiving is "
        "CPU-bound in Python, so up to one per core helps; C-MOVE needs Linux SO_REUSEPORT)",
    )
    net.add_argument(
        "--studies-per-request",
        type=int,
        default=50,
        help="whole studies asked for in one C-MOVE/C-GET as a UID list (default 50; 1 = one per request)",
    )
    net.add_argument(
        "--no-fsync",
        dest="fsync",
        action="store_false",
        help="answer each C-STORE once the instance is written, not once it is on disk: faster "
        "(no two fsyncs per instance), still safe if the pull is killed, but after an OS crash or power "
        "loss recent instances may be empty or cut short (the catalog marks them unreadable)",
    )
    net.add_argument(
        "--timeout", type=float, default=120, help="seconds to wait for each DIMSE reply or HTTP answer"
    )
    net.add_argument("--retries", type=int, default=3, help="retries with back-off per request")
    net.add_argument("--max-pdu", type=int, default=65536, help="maximum PDU size in bytes (0: unlimited)")
    polite = parser.add_argument_group("polite pulling")
    polite.add_argument(
        "--window",
        type=_window_argument,
        metavar="HH:MM-HH:MM",
        help="retrieve only inside this daily local-time window, e.g. 19:00-07:00; outside it the pull "
        "pauses and logs when it resumes (requests already running finish)",
    )
    polite.add_argument(
        "--retrieve-timeout",
        type=float,
        metavar="S",
        help="total seconds one C-MOVE/C-GET (or WADO-RS answer) may take; past it a C-MOVE/C-GET is "
        "cancelled (C-CANCEL), and the request is retried for what is still missing (default: no limit)",
    )
    polite.add_argument(
        "--max-rate", type=float, metavar="N", help="retrieve at most N instances per second on average"
    )
    query = parser.add_argument_group("query")
    query.add_argument(
        "--from", dest="date_from", type=date.fromisoformat, help="first study date, YYYY-MM-DD"
    )
    query.add_argument("--to", dest="date_to", type=date.fromisoformat, help="last study date, YYYY-MM-DD")
    query.add_argument(
        "--modality", nargs="+", default=["CR", "DX"], help="ModalitiesInStudy (default CR DX)"
    )
    query.add_argument("--page-limit", type=int, help="the PACS's C-FIND result cap, if known")
    query.add_argument(
        "--relational-find",
        action="store_true",
        help="plan with IMAGE-level C-FINDs by StudyInstanceUID list, 50 studies per query, for a PACS "
        "that answers relational queries (Orthanc, dcm4chee); a study the answer leaves out or short "
        "is searched per series as usual",
    )
    query.add_argument(
        "--requery-complete",
        action="store_true",
        help="search again the studies the last run's ledger records complete (default: a re-run "
        "plans them from the ledger, so only new and incomplete studies cost instance-level searches)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--work",
        type=Path,
        required=True,
        help="work directory: spool/, catalog/, shards-<g>/ (re-use it to resume)",
    )
    out.add_argument("--id-salt", help="secret salt for patient-id hashes (default $PEDX_ID_SALT)")
    out.add_argument("--code-table", type=Path, help="site protocol-code table, CSV code,label_68")
    out.add_argument("--no-shards", action="store_true", help="stop after the catalog")
    out.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    add_shard_arguments(parser)
    add_scheduler_argument(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PullConfig:
    pacs = web = None
    if args.dicomweb is not None:
        web = DicomwebConfig(
            args.dicomweb,
            authorization=authorization_from(token_file=args.token_file, basic_file=args.basic_auth_file),
            timeout=args.timeout,
            retries=args.retries,
            retrieve_timeout=args.retrieve_timeout,
        )
    else:
        if args.called_aet is None:
            raise ValueError("--pacs needs --called-aet (the PACS's AE title)")
        if args.token_file or args.basic_auth_file:
            raise ValueError("--token-file and --basic-auth-file are for --dicomweb")
        pacs = PacsConfig.parse(
            args.pacs,
            called_aet=args.called_aet,
            calling_aet=args.aet,
            move_destination=args.move_dest,
            dimse_timeout=args.timeout,
            retries=args.retries,
            max_pdu=args.max_pdu,
            retrieve_timeout=args.retrieve_timeout,
        )
    return PullConfig(
        pacs=pacs,
        dicomweb=web,
        work_dir=args.work,
        method=args.method,
        transport=args.transport,
        scp_host=args.scp_host,
        scp_port=args.scp_port,
        date_from=args.date_from,
        date_to=args.date_to,
        modalities=tuple(args.modality),
        page_limit=args.page_limit,
        workers=args.workers,
        processes=args.processes,
        studies_per_request=args.studies_per_request,
        fsync=args.fsync,
        window=args.window,
        max_rate=args.max_rate,
        requery_complete=args.requery_complete,
        relational_find=args.relational_find,
        write_shards=not args.no_shards,
        balance=balance_config_from_args(args),
        preprocessing=resolve_gpu_decode(
            PreprocessParams(size=args.image_size, decode=args.decode), args.gpu_fallback
        ),
        shard_size=args.shard_size,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        cfg = config_from_args(args)
        taxonomy = load_taxonomy(code_table=args.code_table)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    metrics = IngestMetrics()
    server = None
    if args.metrics_port is not None:
        server = metrics.serve(args.metrics_port)
        print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
    try:
        result = pull(
            cfg,
            id_salt=id_salt_from_env(args.id_salt),
            taxonomy=taxonomy,
            metrics=metrics,
            scheduler=args.scheduler,
            dask_workers=args.dask_workers,
        )
    except (PacsError, CatalogError, ShardError, ValueError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    except (KeyboardInterrupt, PullInterrupted):
        print("interrupted: the spool holds only complete instances; run the same command to resume")
        return 130
    finally:
        if server is not None:
            server.shutdown()
    print(
        f"{result.studies} studies, {result.planned_instances} instances to fetch; "
        f"retrieval: {result.retrieval}"
    )
    print(f"catalog {cfg.catalog_path}: " + ", ".join(f"{k}={v}" for k, v in sorted(result.catalog.items())))
    if result.manifest is not None:
        print(format_manifest_summary(result.manifest, cfg.shards_dir))
    if not result.incomplete_studies.empty:
        print(format_incomplete(result.incomplete_studies, cfg.ledger_path))
    if not result.ok:
        print(
            f"{len(result.retrieval.failures)} retrieval(s) failed, {len(result.incomplete_studies)} "
            "study(ies) incomplete; run the same command again to retry them"
        )
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
