"""The catalog of references and recovery (G9, G10): tables in schema ``vms`` and their functions.

``vms.entities`` holds each referenceable entity's metadata, so that user models stay plain:

- ``t``: its last-update time on the owner's own clock, a per-service sequence ``vms.clock__<s>``.
  Services' clocks are not synchronised. A sequence takes no lock, and it never moves back: it
  lives in the core, not in the service's schema, so it survives the loss of that schema.
- ``k``: its epoch. A service starts in epoch 1 and every restore begins a new one. A restored
  entity keeps the backup's epoch (``pending``) until it is first accessed. ``(t, k)`` always
  change together: they name one version.
- ``d``: how many references point at it, the sum of per-holder counts in ``vms.entity_holders``,
  so that a restore of either side can recount exactly. A count belongs to a URI, not to a row:
  a reference lost with its entity is still held until it is given back.
- ``deleted`` (the paper's ⊥): deleting an entity with ``d > 0`` leaves a tombstone holding its
  last value and ``(t, k)``; the tombstone goes when the last reference is deleted.

The functions are owned by the administrator and ``SECURITY DEFINER``, as the lease functions
are: a service calls ``vms.get_reference`` (or ``vms.get_references``, many entities in one
statement) in its own transaction, so the counter moves and commits with the caller's changes
or not at all, and the caller is read from the session's role, so a service cannot count
references in another's name. Services may read which tables are referenceable and where
references are kept; the metadata changes only through the functions.

The tables have a ``MetaData`` of their own; :func:`install` creates them and the functions, and
``Core.install()`` calls it. Core revisions ``0003_references``, ``0006_reads_begin_epochs`` and
``0008_ref_batches_notify_types`` create the same (a test compares).
When this module changes, add a core revision (see ``alembic/README.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import CATALOG_SCHEMA, SERVICES_GROUP_ROLE, quote_ident

__all__ = [
    "RECOVERY_CHANNEL",
    "SQLSTATE_DELETED",
    "SQLSTATE_NOT_FOUND",
    "SQLSTATE_RECOVERING",
    "SQLSTATE_TRUNCATE",
    "amnesia",
    "backups",
    "clock_sequence",
    "entities",
    "entity_holders",
    "install",
    "install_sql",
    "merge_conflicts",
    "metadata",
    "recoveries",
    "ref_services",
    "reference_columns",
    "referenceables",
]

metadata = MetaData(schema=CATALOG_SCHEMA, naming_convention={"pk": "pk_%(table_name)s"})

ref_services = Table(
    "ref_services",
    metadata,
    Column("service", String(40), primary_key=True),
    Column("epoch", Integer, nullable=False, server_default="1"),
    # NULL while serving; 'availability' or 'consistency' while a recovery is open.
    Column("recovering", String(12)),
    Column("recovery_id", UUID(as_uuid=True)),
)
referenceables = Table(
    "referenceables",
    metadata,
    Column("service", String(40), nullable=False),
    Column("entity", String(63), nullable=False),
    Column("key_columns", ARRAY(Text), nullable=False),
    PrimaryKeyConstraint("service", "entity"),
)
# Where references are stored: a JSONB column {uri, t, k, copy} of a holder's table.
reference_columns = Table(
    "reference_columns",
    metadata,
    Column("holder", String(40), nullable=False),
    Column("holder_table", String(63), nullable=False),
    Column("column_name", String(63), nullable=False),
    Column("target_service", String(40), nullable=False),
    Column("target_entity", String(63), nullable=False),
    Column("key_columns", ARRAY(Text), nullable=False),
    PrimaryKeyConstraint("holder", "holder_table", "column_name"),
)
entities = Table(
    "entities",
    metadata,
    Column("uri", Text, primary_key=True),
    Column("service", String(40), nullable=False),
    Column("entity", String(63), nullable=False),
    Column("key", JSONB, nullable=False),
    Column("t", BigInteger, nullable=False),
    Column("k", Integer, nullable=False),
    Column("d", Integer, nullable=False, server_default="0"),
    Column("deleted", Boolean, nullable=False, server_default="false"),
    Column("value", JSONB, comment="a tombstone's last value"),
    Column("pending", Boolean, nullable=False, server_default="false"),
    Column(
        "restored_by", UUID(as_uuid=True), comment="the recovery that restored it, until written or read"
    ),
    Index("ix_entities_service", "service"),
    # What a read asks on every call while its service may be in amnesia ("is anything of it
    # still restored and unread?"): a partial index keeps that answer one probe, not a scan.
    Index("ix_entities_restored", "service", postgresql_where=text("restored_by IS NOT NULL")),
)
entity_holders = Table(
    "entity_holders",
    metadata,
    Column("uri", Text, nullable=False),
    Column("holder", String(40), nullable=False),
    Column("count", Integer, nullable=False),
    PrimaryKeyConstraint("uri", "holder"),
)
# ]lo, hi] on the owner's clock: versions of `uri` stamped in it may be lost. uri NULL: entities
# the backup did not know (created after it). hi NULL: open until the entity's first access.
amnesia = Table(
    "amnesia",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("service", String(40), nullable=False),
    Column("uri", Text),
    Column("recovery_id", UUID(as_uuid=True), nullable=False),
    Column("from_epoch", Integer, nullable=False),
    Column("to_epoch", Integer, nullable=False),
    Column("lo", BigInteger, nullable=False),
    Column("hi", BigInteger),
    Column("recovered_from", ARRAY(Text), nullable=False, server_default="{}"),
    Index("ix_amnesia_uri", "uri"),
    Index("ix_amnesia_service", "service"),
)
recoveries = Table(
    "recoveries",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("service", String(40), nullable=False),
    Column("backup_id", UUID(as_uuid=True), nullable=False),
    Column("mode", String(12), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("backup_epoch", Integer, nullable=False),
    Column("t_backup", BigInteger, nullable=False),
    Column("t_restore", BigInteger, nullable=False),
    Column("expected", ARRAY(Text), nullable=False),
    Column("answered", ARRAY(Text), nullable=False, server_default="{}"),
    # recovering -> completed (every expected holder answered) or timed_out
    Column("status", String(12), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
)
# A holder's cached copy that a merge did not apply because the entity was read (or written)
# in its new epoch: the value someone saw wins, and the amnesia report lists the copy instead.
merge_conflicts = Table(
    "merge_conflicts",
    metadata,
    Column("recovery_id", UUID(as_uuid=True), nullable=False),
    Column("uri", Text, nullable=False),
    Column("holder", String(40), nullable=False),
    Column("service", String(40), nullable=False),
    Column("t", BigInteger, nullable=False),
    Column("k", Integer, nullable=False),
    Column("copy", JSONB, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("recovery_id", "uri", "holder"),
)
backups = Table(
    "backups",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("service", String(40), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("t_backup", BigInteger, nullable=False, comment="every version stamped <= it is in"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("path", Text, nullable=False),
    Column("entities", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
)


def clock_sequence(service: str) -> str:
    """The sequence that is ``service``'s clock."""
    return f"vms.{quote_ident('clock__' + service)}"


SQLSTATE_NOT_FOUND = "VR404"
SQLSTATE_DELETED = "VR410"
SQLSTATE_RECOVERING = "VR503"
SQLSTATE_TRUNCATE = "VR405"
#: NOTIFY channel: "<service>\n<mode>" when a service starts recovering ('availability' or
#: 'consistency') and "<service>\n" when it serves again, so every App knows at once.
RECOVERY_CHANNEL = "vms_recovery"

_GROUP = quote_ident(SERVICES_GROUP_ROLE)

#: ``vms.ref_caller(holder)``: who holds a reference being taken (see ``dbcore.logins``).
REF_CALLER_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.ref_caller(p_holder text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
    DECLARE r text := current_setting('role');
    BEGIN
        IF r = 'none' THEN r := session_user; END IF;
        IF r LIKE 'vms\\_%' AND r NOT IN ('vms_services', 'vms_core') THEN
            RETURN substr(r, 5);
        END IF;
        IF p_holder IS NULL THEN
            RAISE EXCEPTION 'a reference needs a holder service' USING ERRCODE = '22023';
        END IF;
        RETURN p_holder;
    END $$
"""

#: ``vms.ref_take(uri, count, copy, columns, holder)``: take (or refresh) one reference for a
#: holder already resolved; a refusal is returned as ``{"error": "not_found"|"deleted", ...}``.
REF_TAKE_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.ref_take(
        p_uri text, p_count boolean, p_copy boolean, p_columns text[], p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('uri', p_uri, 'error', 'not_found',
                                      'message', format('no referenceable entity %s', p_uri));
        END IF;
        s := vms.ref_service(e.service, true);
        IF e.deleted AND p_count THEN
            RETURN jsonb_build_object('uri', p_uri, 'error', 'deleted',
                                      'message', format('entity %s was deleted', p_uri));
        END IF;
        IF e.pending THEN  -- the first access stamps a new version, in the new epoch
            e := vms.ref_access(e);
            e.t := vms.ref_tick(e.service);
            e.k := s.epoch;
        END IF;
        IF p_count THEN
            e.d := e.d + 1;
            INSERT INTO vms.entity_holders AS h (uri, holder, count) VALUES (p_uri, p_holder, 1)
            ON CONFLICT (uri, holder) DO UPDATE SET count = h.count + 1;
        END IF;
        -- A copy is a read of the entity's state: a merge must not overwrite what it saw.
        UPDATE vms.entities SET t = e.t, k = e.k, d = e.d, pending = e.pending,
               restored_by = CASE WHEN p_copy THEN NULL ELSE e.restored_by END
         WHERE uri = p_uri;
        RETURN jsonb_build_object('uri', e.uri, 't', e.t, 'k', e.k, 'deleted', e.deleted,
                                  'copy', CASE WHEN p_copy THEN vms.ref_copy(e, p_columns) END);
    END $$
"""

#: ``vms.get_reference(uri, count, copy, columns, holder)``: one reference; raises a refusal
#: (SQLSTATE ``VR404``, ``VR410``).
GET_REFERENCE_FUNCTION = f"""
    CREATE OR REPLACE FUNCTION vms.get_reference(
        p_uri text, p_count boolean, p_copy boolean, p_columns text[], p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE answer jsonb := vms.ref_take(p_uri, p_count, p_copy, p_columns, vms.ref_caller(p_holder));
    BEGIN
        CASE answer ->> 'error'
            WHEN 'not_found' THEN
                RAISE EXCEPTION '%', answer ->> 'message' USING ERRCODE = '{SQLSTATE_NOT_FOUND}';
            WHEN 'deleted' THEN
                RAISE EXCEPTION '%', answer ->> 'message' USING ERRCODE = '{SQLSTATE_DELETED}';
            ELSE
                RETURN answer;
        END CASE;
    END $$
"""

#: ``vms.get_references(uris, count, copies, holder)``: one answer per URI, as a JSON array in
#: the order given; ``copies`` has one element per URI: ``false``, ``true`` (the whole row) or
#: an array of column names.
GET_REFERENCES_FUNCTION = """
    CREATE OR REPLACE FUNCTION vms.get_references(
        p_uris text[], p_count boolean, p_copies jsonb, p_holder text)
    RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE
        holder_ text := vms.ref_caller(p_holder);
        answers jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_uris)]);
        target record;
        copy_ jsonb;
    BEGIN
        -- The entities' rows are locked in URI order, whatever order the caller gave: two
        -- batches over the same entities then lock them in the same order. In the caller's
        -- order, one batch taking A then B and another B then A could deadlock (each holding
        -- the row the other waits for) until Postgres aborts one of them.
        FOR target IN SELECT u.uri, u.n::int AS n FROM unnest(p_uris) WITH ORDINALITY AS u(uri, n)
                       ORDER BY u.uri, u.n LOOP
            copy_ := coalesce(p_copies -> (target.n - 1), 'false');
            answers[target.n] := vms.ref_take(
                target.uri, p_count, copy_ <> 'false',
                CASE WHEN jsonb_typeof(copy_) = 'array'
                     THEN ARRAY(SELECT jsonb_array_elements_text(copy_)) END,
                holder_);
        END LOOP;
        RETURN to_jsonb(answers);
    END $$
"""

# The functions every trigger and reference operation shares. Each takes the entity row FOR
# UPDATE first: that lock orders a delete after every reference taken before it, so "d = 0, so
# remove" can never race with a new reference (the same reason leases lock the stock row).
install_sql: Sequence[str] = (
    f"""
    CREATE OR REPLACE FUNCTION vms.ref_services_notify() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR NEW.recovering IS DISTINCT FROM OLD.recovering THEN
            PERFORM pg_notify('{RECOVERY_CHANNEL}', NEW.service || E'\\n' || coalesce(NEW.recovering, ''));
        END IF;
        RETURN NULL;
    END $$
    """,
    # TRUNCATE fires no row trigger: on a referenceable table it would forget which entities
    # were referenced (and leave no tombstones), so it is refused; DELETE keeps the bookkeeping.
    f"""
    CREATE OR REPLACE FUNCTION vms.ref_refuse_truncate() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        RAISE EXCEPTION 'TRUNCATE of %.% is refused because the table is referenceable and '
                        'TRUNCATE would lose which of its entities are referenced; DELETE its '
                        'rows instead',
                        TG_TABLE_SCHEMA, TG_TABLE_NAME
              USING ERRCODE = '{SQLSTATE_TRUNCATE}';
    END $$
    """,
    "CREATE OR REPLACE FUNCTION vms.uri_part(text) RETURNS text LANGUAGE sql IMMUTABLE "
    "AS $$ SELECT replace(replace($1, '%', '%25'), '/', '%2F') $$",
    """
    CREATE OR REPLACE FUNCTION vms.ref_tick(p_service text) RETURNS bigint
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $$
        SELECT nextval(format('vms.%I', 'clock__' || p_service)::regclass)
    $$
    """,
    # The holder is the calling service (its login role, or the role an administrator's
    # migration set); only the administrator and the core role may name one.
    REF_CALLER_FUNCTION,
    # First access after a restore: close the entity's open amnesia at a fresh tick. A caller
    # that stamps a new version does so with a later tick and the current epoch (t and k always
    # change together: (t, k) names one version), so nothing taken after the access falls in
    # ]lo, hi]. A delete stamps nothing: the tombstone keeps its version's (t, k).
    """
    CREATE OR REPLACE FUNCTION vms.ref_access(e vms.entities) RETURNS vms.entities
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE hi_ bigint;
    BEGIN
        IF e.pending THEN
            hi_ := vms.ref_tick(e.service);
            UPDATE vms.amnesia SET hi = hi_ WHERE uri = e.uri AND hi IS NULL;
            e.pending := false;
        END IF;
        RETURN e;
    END $$
    """,
    f"""
    CREATE OR REPLACE FUNCTION vms.ref_service(p_service text, p_write boolean) RETURNS vms.ref_services
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE s vms.ref_services;
    BEGIN
        SELECT * INTO s FROM vms.ref_services WHERE service = p_service;
        IF s.recovering = 'consistency' AND p_write THEN
            RAISE EXCEPTION 'service % is recovering (consistency mode): it serves again when every '
                'referencing service has answered or the recovery times out', p_service
                USING ERRCODE = '{SQLSTATE_RECOVERING}';
        END IF;
        RETURN s;
    END $$
    """,
    # Removing an entity ends what is still open of its amnesia (it was never accessed since a
    # restore): no version of it can be lost after it is gone, and a later re-creation of the
    # same URI must not fall inside the interval.
    """
    CREATE OR REPLACE FUNCTION vms.ref_forget(p_uri text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE svc text; hi_ bigint;
    BEGIN
        SELECT service INTO svc FROM vms.entities WHERE uri = p_uri;
        IF NOT FOUND THEN RETURN; END IF;
        IF EXISTS (SELECT 1 FROM vms.amnesia WHERE uri = p_uri AND hi IS NULL) THEN
            hi_ := vms.ref_tick(svc);
            UPDATE vms.amnesia SET hi = hi_ WHERE uri = p_uri AND hi IS NULL;
        END IF;
        DELETE FROM vms.entities WHERE uri = p_uri;
    END $$
    """,
    # A tombstone goes once nothing references it, but never while a recovery is open: until
    # every holder has answered, d may count too few references.
    """
    CREATE OR REPLACE FUNCTION vms.ref_collect(p_uri text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM vms.entities e JOIN vms.ref_services s ON s.service = e.service
                    WHERE e.uri = p_uri AND e.deleted AND e.d <= 0 AND s.recovering IS NULL) THEN
            PERFORM vms.ref_forget(p_uri);
        END IF;
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION vms.ref_written(p_service text, p_entity text, p_uri text, p_key jsonb)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        IF current_setting('vms.merging', true) = 'on' THEN RETURN; END IF;  -- recovery sets t, k
        s := vms.ref_service(p_service, true);
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN
            -- Holders may still count references to this URI (lost ones): d starts from them.
            INSERT INTO vms.entities (uri, service, entity, key, t, k, d)
            VALUES (p_uri, p_service, p_entity, p_key, vms.ref_tick(p_service), s.epoch,
                    (SELECT coalesce(sum(count), 0) FROM vms.entity_holders WHERE uri = p_uri));
            RETURN;
        END IF;
        e := vms.ref_access(e);
        UPDATE vms.entities SET t = vms.ref_tick(p_service), k = s.epoch, pending = false,
               deleted = false, value = NULL, restored_by = NULL
         WHERE uri = p_uri;
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION vms.ref_deleted(p_service text, p_uri text, p_value jsonb)
    RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        IF current_setting('vms.merging', true) = 'on' THEN RETURN; END IF;
        s := vms.ref_service(p_service, true);
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        IF NOT FOUND THEN RETURN; END IF;
        e := vms.ref_access(e);
        IF e.d > 0 OR s.recovering IS NOT NULL THEN  -- keep a tombstone: last value, same (t, k)
            UPDATE vms.entities SET deleted = true, value = p_value, k = e.k, pending = false,
                   restored_by = NULL WHERE uri = p_uri;
        ELSE
            PERFORM vms.ref_forget(p_uri);
            DELETE FROM vms.entity_holders WHERE uri = p_uri;
        END IF;
    END $$
    """,
    # The referenced row as JSON (a tombstone's kept value), projected on p_columns + its key.
    """
    CREATE OR REPLACE FUNCTION vms.ref_copy(e vms.entities, p_columns text[]) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE keys text[]; row_ jsonb;
    BEGIN
        SELECT key_columns INTO keys FROM vms.referenceables
         WHERE service = e.service AND entity = e.entity;
        IF e.deleted THEN
            row_ := e.value;
        ELSE
            EXECUTE format('SELECT to_jsonb(x) FROM %1$I.%2$I x, '
                           'jsonb_populate_record(NULL::%1$I.%2$I, $1) k WHERE %3$s',
                           e.service, e.entity,
                           (SELECT string_agg(format('x.%1$I = k.%1$I', c), ' AND ') FROM unnest(keys) c))
               INTO row_ USING e.key;
        END IF;
        IF p_columns IS NULL OR row_ IS NULL THEN RETURN row_; END IF;
        RETURN (SELECT jsonb_object_agg(j.key, j.value) FROM jsonb_each(row_) j
                 WHERE j.key = ANY(p_columns || keys));
    END $$
    """,
    # Taking a reference (p_count) and refreshing one (not p_count): both are accesses of the
    # entity. A refusal (no such entity, a tombstone) is an answer, {"error": ..., "message": ...},
    # not an exception, so a batch can go on past it; nothing is counted for it. It keeps the
    # row lock it took: the answer holds until the caller's transaction ends. The holder is
    # already resolved (vms.ref_caller): no service may call this one itself.
    REF_TAKE_FUNCTION,
    # One reference, raising a refusal: the caller's transaction (or savepoint) is then aborted.
    GET_REFERENCE_FUNCTION,
    # Many references in one statement, each refusal an answer in its place (nothing raised).
    GET_REFERENCES_FUNCTION,
    # A read of entities (recovery paper, Definition 2: "a new epoch begins at the first reading
    # or written access"): for each restored entity not yet read or written since, its first
    # access closes the amnesia and stamps a new version in the new epoch, exactly as
    # get_reference does; and it is no longer "restored": a later merge must not overwrite a
    # value someone has seen (recovery.merge reports the copy as a conflict instead). The row
    # lock orders the read against a concurrent merge of the same entity. p_uris NULL: every
    # restored entity of table p_entity (a read that cannot say which rows it saw, such as a
    # cross-service query: conservative, a later copy of them becomes a conflict, not a loss).
    # Returns whether any entity of the service is still restored and unread, so callers can
    # stop asking.
    """
    CREATE OR REPLACE FUNCTION vms.ref_read(p_service text, p_entity text, p_uris text[])
    RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; s vms.ref_services;
    BEGIN
        s := vms.ref_service(p_service, true);
        FOR e IN SELECT * FROM vms.entities
                  WHERE service = p_service AND restored_by IS NOT NULL
                    AND (uri = ANY(p_uris) OR (p_uris IS NULL AND entity = p_entity))
                  ORDER BY uri FOR UPDATE LOOP
            IF e.pending THEN
                e := vms.ref_access(e);
                UPDATE vms.entities SET t = vms.ref_tick(p_service), k = s.epoch, pending = false,
                       restored_by = NULL WHERE uri = e.uri;
            ELSE
                UPDATE vms.entities SET restored_by = NULL WHERE uri = e.uri;
            END IF;
        END LOOP;
        RETURN EXISTS (SELECT 1 FROM vms.entities WHERE service = p_service AND restored_by IS NOT NULL);
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION vms.delete_reference(p_uri text, p_holder text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
    DECLARE e vms.entities; exists_ boolean; holder_ text := vms.ref_caller(p_holder);
    BEGIN
        SELECT * INTO e FROM vms.entities WHERE uri = p_uri FOR UPDATE;
        exists_ := FOUND;
        -- Only what this holder counted can be released: after a restore its count may be
        -- stale, and a stale decrement must not free another holder's reference. (A count may
        -- outlive its entity: a reference lost with it is still held until given back.)
        UPDATE vms.entity_holders SET count = count - 1
         WHERE uri = p_uri AND holder = holder_ AND count > 0;
        IF NOT FOUND THEN RETURN false; END IF;
        DELETE FROM vms.entity_holders WHERE uri = p_uri AND holder = holder_ AND count <= 0;
        IF exists_ THEN
            UPDATE vms.entities SET d = greatest(d - 1, 0) WHERE uri = p_uri;
            PERFORM vms.ref_collect(p_uri);
        END IF;
        RETURN true;
    END $$
    """,
    *(
        f"REVOKE ALL ON FUNCTION vms.{fn} FROM PUBLIC"
        for fn in (
            "ref_tick(text)",
            "ref_access(vms.entities)",
            "ref_service(text, boolean)",
            "ref_forget(text)",
            "ref_collect(text)",
            "ref_written(text, text, text, jsonb)",
            "ref_deleted(text, text, jsonb)",
            "ref_copy(vms.entities, text[])",
            "ref_take(text, boolean, boolean, text[], text)",
            "get_reference(text, boolean, boolean, text[], text)",
            "get_references(text[], boolean, jsonb, text)",
            "ref_read(text, text, text[])",
            "delete_reference(text, text)",
        )
    ),
    # What is referenceable and where references are kept is public catalog knowledge; the
    # metadata itself (t, k, d) changes only through the functions above.
    f"GRANT SELECT ON vms.referenceables, vms.reference_columns TO {_GROUP}",
    f"GRANT EXECUTE ON FUNCTION vms.get_reference(text, boolean, boolean, text[], text) TO {_GROUP}",
    f"GRANT EXECUTE ON FUNCTION vms.get_references(text[], boolean, jsonb, text) TO {_GROUP}",
    f"GRANT EXECUTE ON FUNCTION vms.delete_reference(text, text) TO {_GROUP}",
    f"GRANT EXECUTE ON FUNCTION vms.ref_read(text, text, text[]) TO {_GROUP}",
)

_INSTALL_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('vms.references'))")
# Created only when missing: creating a trigger locks the table, and every App start installs.
_NOTIFY_TRIGGER_EXISTS = text(
    "SELECT 1 FROM pg_trigger WHERE tgname = 'ref_services_notify' "
    "AND tgrelid = CAST('vms.ref_services' AS regclass)"
)
_NOTIFY_TRIGGER = text(
    "CREATE TRIGGER ref_services_notify AFTER INSERT OR UPDATE ON vms.ref_services "
    "FOR EACH ROW EXECUTE FUNCTION vms.ref_services_notify()"
)


async def install(conn: AsyncConnection) -> None:
    """Create the catalog of references and recovery (G9, G10) and its functions. Idempotent."""
    await conn.execute(_INSTALL_LOCK)
    await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {CATALOG_SCHEMA}"))
    await conn.run_sync(metadata.create_all)
    for statement in install_sql:
        await conn.execute(text(statement))
    if (await conn.execute(_NOTIFY_TRIGGER_EXISTS)).first() is None:
        await conn.execute(_NOTIFY_TRIGGER)
