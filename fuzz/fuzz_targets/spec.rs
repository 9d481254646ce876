//! Watermark-spec parsing (TOML and JSON, as the CLI and the service take them) never panics and
//! never allocates for a size it has not checked; an accepted spec's trigger stamps an image of
//! the spec's shape, and its JSON form parses back to the same spec.
#![no_main]
use hallmark::dataset::ImageShape;
use hallmark::spec::WatermarkSpec;
use hallmark::watermark::Stamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = WatermarkSpec::from_toml_str(text, None, "fuzz.toml").or_else(|_| {
        serde_json::from_str(text)
            .map_err(|_| ())
            .and_then(|v| WatermarkSpec::from_json_value(v).map_err(|_| ()))
    });
    if let Ok(spec) = parsed {
        let again = WatermarkSpec::from_json_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(again.sha256(), spec.sha256());
        let shape = spec.image.unwrap_or(ImageShape {
            height: 28,
            width: 28,
            channels: 1,
        });
        if let Ok(stamp) = Stamp::new(&spec.trigger, spec.seed, shape) {
            let mut img = vec![0u8; shape.len()];
            stamp.apply(&mut img);
        }
    }
});
