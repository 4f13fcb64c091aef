//! Event stores: `SqliteEventStore` (the embedded default) and `MemoryEventStore`.

mod memory;
mod sqlite;

pub use memory::MemoryEventStore;
pub use sqlite::{
    ConditionValue, EventTableMapping, RowCondition, SqliteEventStore, StreamAppend,
    plain_identifier,
};
