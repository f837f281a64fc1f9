//! Ties a transfer record's columns to what it is, so that no write (a
//! manual repair included) can leave a record the ledger would replay
//! wrongly: a fence (`fenced`) is a failed `never_received` record with no
//! request; any other record carries its request, and a succeeded one both
//! entries' seqs while a failed one has its reason and no seq.
//!
//! `NOT VALID`: rows written before are not scanned at start-up (the
//! migrations run in one transaction, and a scan there would hold the
//! table's lock for as long); every row written from now on is checked.
//! Those rows were written by the same code, in these shapes; an operator can
//! confirm it at a quiet time with
//! `ALTER TABLE transfers VALIDATE CONSTRAINT transfers_shape`, which does
//! not block writes.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

common::sql_migration!(
    Migration,
    up: "ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_shape;
         ALTER TABLE transfers ADD CONSTRAINT transfers_shape CHECK (
           CASE WHEN fenced THEN
             status = 'failed' AND reason IS NOT DISTINCT FROM 'never_received'
             AND from_account IS NULL AND to_account IS NULL AND amount IS NULL
             AND requested_at IS NULL AND from_seq IS NULL AND to_seq IS NULL
           ELSE
             from_account IS NOT NULL AND to_account IS NOT NULL AND amount IS NOT NULL
             AND requested_at IS NOT NULL
             AND CASE status
                   WHEN 'succeeded' THEN reason IS NULL AND from_seq IS NOT NULL AND to_seq IS NOT NULL
                   ELSE reason IS NOT NULL AND from_seq IS NULL AND to_seq IS NULL
                 END
           END) NOT VALID",
    down: "ALTER TABLE transfers DROP CONSTRAINT IF EXISTS transfers_shape",
);
