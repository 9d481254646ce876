//! Secret-record parsing never panics, and an accepted record's commitment is stable.
#![no_main]
use hallmark::watermark::SecretRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(r) = SecretRecord::from_json(text)
    {
        let again = SecretRecord::from_json(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again.commitment(), r.commitment());
    }
});
