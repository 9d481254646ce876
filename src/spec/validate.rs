//! Checking a spec field by field, and against a dataset.

use super::trigger::check_shape;
use super::*;

impl WatermarkSpec {
    /// Checks every field on its own (fit to a dataset is [`WatermarkSpec::check_fits`]).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(field("name", "must be 1 to 128 characters"));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1.0) {
            return Err(field(
                "rate",
                format!("must be in (0, 1], got {}", self.rate),
            ));
        }
        if let Some(src) = &self.source_classes {
            if src.is_empty() {
                return Err(field(
                    "source_classes",
                    "must not be empty (leave it out for all classes)",
                ));
            }
            let mut s = src.clone();
            s.sort_unstable();
            if s.windows(2).any(|w| w[0] == w[1]) {
                return Err(field("source_classes", "lists a class twice"));
            }
            if matches!(self.labelling, Labelling::AllToAll { .. }) {
                return Err(field(
                    "source_classes",
                    "all-to-all labels send every class to another: leave source_classes out",
                ));
            }
            match (self.labelling.poison_class(), &self.gradient_matching) {
                (Some(_), None)
                    if !matches!(self.labelling, Labelling::UntargetedCleanLabel { .. }) =>
                {
                    return Err(field(
                        "source_classes",
                        "clean-label specs poison the target class only",
                    ));
                }
                (Some(p), Some(_)) if src.contains(&p) => {
                    return Err(field(
                        "source_classes",
                        format!("class {p} is the poisoned class; a source class must be another"),
                    ));
                }
                _ => {}
            }
        }
        if let Some(s) = self.image {
            check_shape("image", s)?;
        }
        self.validate_crafting()?;
        family::validate(self)?;
        self.validate_trigger()
    }

    /// Checks that the spec can be applied to `dataset` (shape, classes, trigger fit).
    pub fn check_fits(&self, dataset: &Dataset) -> Result<(), SpecError> {
        let shape = dataset.shape();
        if let Some(s) = self.image
            && s != shape
        {
            return Err(field(
                "image",
                format!("spec is for {s} images, the dataset's are {shape}"),
            ));
        }
        let k = dataset.num_classes() as u32;
        if let Some(t) = self.labelling.target().or(self.labelling.poison_class())
            && t >= k
        {
            return Err(field(
                match self.labelling {
                    Labelling::UntargetedCleanLabel { .. } => "labelling.poison_class",
                    _ => "labelling.target",
                },
                format!("class {t} does not exist: the dataset has {k} classes"),
            ));
        }
        if (self.labelling.is_untargeted() || matches!(self.labelling, Labelling::AllToAll { .. }))
            && k < 2
        {
            return Err(field(
                "labelling",
                "untargeted and all-to-all labels need at least 2 classes",
            ));
        }
        if let Some(c) = self.source_classes.iter().flatten().find(|c| **c >= k) {
            return Err(field(
                "source_classes",
                format!("class {c} does not exist: the dataset has {k} classes"),
            ));
        }
        match &self.trigger {
            Trigger::Patch(p) => p.grid(shape.height, shape.width).map(|_| ()),
            Trigger::Blend(b) => {
                if let Some(r) = b.region
                    && (r.row + r.height > shape.height || r.col + r.width > shape.width)
                {
                    return Err(field(
                        "trigger.region",
                        format!("{r:?} does not fit {shape} images"),
                    ));
                }
                if let Some(p) = &b.pattern
                    && (p.shape.height, p.shape.width) != (shape.height, shape.width)
                {
                    return Err(field(
                        "trigger.image",
                        format!(
                            "pattern is {}×{}, images are {}×{}",
                            p.shape.height, p.shape.width, shape.height, shape.width
                        ),
                    ));
                }
                Ok(())
            }
            Trigger::Rotate(_) => Ok(()),
            Trigger::Perturbation(p) if !p.values.is_empty() && p.values.len() != shape.len() => {
                Err(field(
                    "trigger.values",
                    format!(
                        "{} values, the dataset's images {shape} need {}",
                        p.values.len(),
                        shape.len()
                    ),
                ))
            }
            Trigger::Perturbation(p) => {
                for c in &p.controls {
                    if c.target >= k {
                        return Err(field(
                            "trigger.controls.target",
                            format!(
                                "class {} does not exist: the dataset has {k} classes",
                                c.target
                            ),
                        ));
                    }
                }
                Ok(())
            }
            Trigger::Generated(g) => {
                for (name, net) in [("trigger.pattern", &g.pattern), ("trigger.mask", &g.mask)] {
                    if let Some(n) = net {
                        n.compile(name, shape.channels, shape.height, shape.width)?;
                    }
                }
                Ok(())
            }
            Trigger::Physical(p) => {
                let mut one = self.clone();
                one.trigger = (*p.inner).clone();
                one.check_fits(dataset)
                    .map_err(|e| field("trigger.inner", e.to_string()))
            }
            Trigger::Reflection(r) => match r.candidates.first() {
                Some(c) if c.shape != shape => Err(field(
                    "trigger.candidates",
                    format!("reflections are {}, the dataset's images {shape}", c.shape),
                )),
                _ => Ok(()),
            },
            Trigger::Adaptive(a) => {
                for (k, p) in a.pieces.iter().enumerate() {
                    let mut one = self.clone();
                    one.trigger = p.clone();
                    one.check_fits(dataset)
                        .map_err(|e| field(&format!("trigger.pieces[{k}]"), e.to_string()))?;
                }
                Ok(())
            }
            Trigger::Warp(w) => {
                if w.k > shape.height.min(shape.width) {
                    return Err(field(
                        "trigger.k",
                        format!("grid size {} exceeds the image size {shape}", w.k),
                    ));
                }
                Ok(())
            }
        }
    }
}
