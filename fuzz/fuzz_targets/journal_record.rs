//! Recovery reads back whatever bytes the disk holds: any entry or log record (key and value) is
//! decoded or refused, never a panic, and what decodes re-encodes to the very same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xsrec::history::journal::{decode_entry, decode_record, encode_entry, encode_record};

fuzz_target!(|input: (&[u8], &[u8])| {
    let (key, value) = input;
    if let Some((user, seq, events)) = decode_entry(key, value) {
        assert_eq!(encode_entry(user, seq, &events), (key.to_vec(), value.to_vec()));
    }
    if let Some((seq, appends)) = decode_record(key, value) {
        assert_eq!(encode_record(seq, &appends), (key.to_vec(), value.to_vec()));
    }
});
