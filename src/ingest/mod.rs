//! Getting transactions in: the schema, timestamps, file readers, the
//! Kafka message decoder and the label message.

pub mod decode;
pub mod label;
pub mod reader;
pub mod time;
pub mod transaction;

pub use reader::{ReadError, TransactionReader};
pub use time::EventTime;
pub use transaction::{AttrValue, Attributes, Channel, FieldError, Transaction};
