//! Arbitrary bytes into the safetensors header parser: it must never panic, and whenever it
//! accepts, every tensor's byte range must lie inside the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sun_assistant::formats::safetensors::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_header(data, "fuzz input") {
        assert!(
            header.data_start <= data.len(),
            "data section starts past the input"
        );
        for t in &header.tensors {
            assert!(t.begin <= t.end, "{}: range runs backwards", t.name);
            let end = header
                .data_start
                .checked_add(t.end)
                .expect("range end overflows");
            assert!(end <= data.len(), "{}: range ends past the input", t.name);
        }
    }
});
