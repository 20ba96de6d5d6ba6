//! Arbitrary bytes into the GGUF reader: it must never panic; whenever it accepts a file, every
//! tensor's data lies inside it and dequantizing any tensor is an error or a value per element.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sun_assistant::formats::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data, "fuzz input") {
        for info in file.tensors() {
            if let Ok(values) = file.tensor_f32(info) {
                assert_eq!(
                    values.len() as u64,
                    info.numel() as u64,
                    "{}: wrong element count",
                    info.name
                );
            }
        }
    }
});
