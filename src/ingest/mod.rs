//! Getting transactions in: the schema, timestamps and file readers.

pub mod reader;
pub mod time;
pub mod transaction;

pub use reader::{ReadError, TransactionReader};
pub use time::EventTime;
pub use transaction::{Channel, FieldError, Transaction};
