//! Reading specs: TOML files (external files inlined), JSON from users or from records.

use super::*;

impl WatermarkSpec {
    /// Loads and validates a TOML spec file; a blend image is read relative to it.
    pub fn from_toml_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_toml_str(&text, path.parent(), &path.display().to_string())
    }

    /// Parses and validates TOML; `base` is where relative file names are resolved.
    pub fn from_toml_str(text: &str, base: Option<&Path>, origin: &str) -> Result<Self, SpecError> {
        let parse_err = |e: String| SpecError::Parse {
            origin: origin.into(),
            message: e,
        };
        // A family that draws the target leaves it out of the labelling: the document is
        // completed before it becomes a spec. (A document the untyped reader cannot hold, such
        // as a seed above 2^63, is read as it is.)
        let prepared = match toml::from_str::<toml::Value>(text) {
            Ok(doc) => {
                let mut json = serde_json::to_value(&doc).map_err(|e| parse_err(e.to_string()))?;
                let before = json.clone();
                family::prepare_document(&mut json)?;
                (json != before).then_some(json)
            }
            Err(_) => None,
        };
        let mut spec: Self = match prepared {
            Some(json) => serde_json::from_value(json).map_err(|e| parse_err(e.to_string()))?,
            None => toml::from_str(text).map_err(|e| parse_err(e.to_string()))?,
        };
        spec.inline_files(base.unwrap_or(Path::new(".")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a spec written by a user as JSON (a family may leave out the target
    /// it draws).
    pub fn from_user_json(mut v: serde_json::Value) -> Result<Self, SpecError> {
        family::prepare_document(&mut v)?;
        Self::from_json_value(v)
    }

    /// Parses and validates the JSON form kept in secret records.
    pub fn from_json_value(v: serde_json::Value) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_value(v).map_err(|e| SpecError::Parse {
            origin: "spec".into(),
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn inline_files(&mut self, base: &Path) -> Result<(), SpecError> {
        if let Trigger::Reflection(r) = &mut self.trigger
            && r.candidates.is_empty()
        {
            let (Some(name), Some(shape)) = (&r.images, self.image) else {
                return Err(field(
                    "trigger.images",
                    "a reflection trigger needs a folder of images and the spec's image shape",
                ));
            };
            r.candidates = load_images(&base.join(name), shape, r.max_candidates)?;
        }
        if let Trigger::Blend(b) = &mut self.trigger
            && b.source == BlendSource::Image
            && b.candidates.is_empty()
            && let Some(name) = &b.images
        {
            let Some(shape) = self.image else {
                return Err(field(
                    "trigger.images",
                    "a folder of blend images needs the spec's image shape",
                ));
            };
            b.candidates = load_images(&base.join(name), shape, MAX_BLEND_IMAGES)?;
        }
        if let Trigger::Blend(b) = &mut self.trigger
            && b.source == BlendSource::Image
            && b.pattern.is_none()
            && b.images.is_none()
        {
            let Some(name) = &b.image else {
                return Err(field(
                    "trigger.image",
                    "source = \"image\" needs an image file",
                ));
            };
            let path = base.join(name);
            let img = image::open(&path)
                .map_err(|e| field("trigger.image", format!("{}: {e}", path.display())))?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (channels, raw) = if img.color().has_color() {
                (3, img.to_rgb8().into_raw())
            } else {
                (1, img.to_luma8().into_raw())
            };
            b.pattern = Some(EmbeddedImage::from_pixels(
                ImageShape {
                    height: h,
                    width: w,
                    channels,
                },
                &raw,
            ));
        }
        Ok(())
    }
}

/// At most this many images of a blend family's folder are read (each is kept in the record).
const MAX_BLEND_IMAGES: usize = 1024;

/// Reads up to `max` images of `dir` in name order (Refool's reflections, a blend family's
/// patterns), converted to `shape`'s channels and resized to its size (Catmull-Rom, close to the
/// OpenCV cubic resize BackdoorBox uses).
fn load_images(dir: &Path, shape: ImageShape, max: usize) -> Result<Vec<EmbeddedImage>, SpecError> {
    let bad = |m: String| field("trigger.images", m);
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "bmp"
                )
            })
        })
        .collect();
    names.sort();
    names.truncate(max);
    if names.is_empty() {
        return Err(bad(format!(
            "{} holds no PNG, JPEG or BMP image",
            dir.display()
        )));
    }
    names
        .iter()
        .map(|p| {
            let img = image::open(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            let img = img.resize_exact(
                shape.width as u32,
                shape.height as u32,
                image::imageops::FilterType::CatmullRom,
            );
            let raw = if shape.channels == 3 {
                img.to_rgb8().into_raw()
            } else {
                img.to_luma8().into_raw()
            };
            Ok(EmbeddedImage::from_pixels(shape, &raw))
        })
        .collect()
}
