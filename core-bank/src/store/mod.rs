//! sea-orm entities of the core tables that are read and written row by row
//! (customers, accounts). The ledger's hot path uses set-based SQL instead
//! (see [`crate::ledger`]).

pub mod account;
pub mod customer;
