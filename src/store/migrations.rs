//! The schema migrations, embedded in the binary. Each is made as sqlx's own directory source
//! makes it from `migrations/<backend>/<VERSION>_<DESCRIPTION>.sql` (the version from the name,
//! the description with `_` read as a space, the checksum of the file's text), so a database
//! migrated by any earlier build validates against them; `tests` pins their checksums.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

/// One backend's migration files: (file name, text).
type Files = &'static [(&'static str, &'static str)];

/// `SQLITE` and `POSTGRES`: the files of one list of names, each from its backend's folder.
macro_rules! embed {
    ($($name:literal),* $(,)?) => {
        const SQLITE: Files =
            &[$(($name, include_str!(concat!("../../migrations/sqlite/", $name)))),*];
        const POSTGRES: Files =
            &[$(($name, include_str!(concat!("../../migrations/postgres/", $name)))),*];
    };
}

embed!(
    "0001_initial.sql",
    "0002_grant_endpoints.sql",
    "0003_trigger_sets.sql",
    "0004_console_sessions.sql",
    "0005_streamed_shards.sql",
    "0006_combined_verifications.sql",
);

/// The embedded files of one backend as a migration source.
#[derive(Debug, Clone, Copy)]
struct Embedded(Files);

impl Embedded {
    fn migrations(self) -> Result<Vec<Migration>, String> {
        self.0
            .iter()
            .map(|(name, sql)| {
                let (version, rest) = name
                    .split_once('_')
                    .ok_or_else(|| format!("migration file {name:?}: no `_` after its version"))?;
                let version: i64 = version
                    .parse()
                    .map_err(|_| format!("migration file {name:?}: its version is not a number"))?;
                let kind = MigrationType::from_filename(rest);
                let description = rest.trim_end_matches(kind.suffix()).replace('_', " ");
                Ok(Migration::new(
                    version,
                    Cow::Owned(description),
                    kind,
                    Cow::Borrowed(*sql),
                    sql.starts_with("-- no-transaction"),
                ))
            })
            .collect()
    }
}

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { self.migrations().map_err(BoxDynError::from) })
    }
}

/// The migrator of SQLite databases.
pub(super) async fn sqlite() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(SQLITE)).await
}

/// The migrator of PostgreSQL databases.
pub(super) async fn postgres() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(POSTGRES)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `migrations/` is embedded, in order.
    #[test]
    fn every_migration_file_is_embedded() {
        for (dir, files) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let mut names: Vec<String> =
                std::fs::read_dir(format!("{}/migrations/{dir}", env!("CARGO_MANIFEST_DIR")))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
            names.sort();
            let embedded: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
            assert_eq!(names, embedded, "{dir}");
        }
    }

    /// Versions, descriptions and checksums as the databases migrated so far recorded them
    /// (sqlx's `migrate!` of the same files): a change here would refuse every existing database.
    #[test]
    fn migrations_keep_the_recorded_versions_and_checksums() {
        for (backend, files, want) in [
            ("sqlite", SQLITE, GOLDEN_SQLITE),
            ("postgres", POSTGRES, GOLDEN_POSTGRES),
        ] {
            let got: Vec<(i64, String, String, bool)> = Embedded(files)
                .migrations()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m.version,
                        m.description.to_string(),
                        hex::encode(&m.checksum),
                        m.no_tx,
                    )
                })
                .collect();
            let want: Vec<(i64, String, String, bool)> = want
                .iter()
                .map(|(v, d, c)| (*v, d.to_string(), c.to_string(), false))
                .collect();
            assert_eq!(got, want, "{backend}");
        }
    }

    const GOLDEN_SQLITE: &[(i64, &str, &str)] = &[
        (
            1,
            "initial",
            "6c457c5181fdbbfe533e544158442ba8050d79e5e894eabf60cb83c38619e35d11b5f1bb843191e7e74381b8724a093a",
        ),
        (
            2,
            "grant endpoints",
            "90334235d1528cda1ff9c22aa7f227032383e1c9a0ef4b802f969c59901d4b200c7e3aef78dcdb9ee0e69fba6f7b6532",
        ),
        (
            3,
            "trigger sets",
            "93a15bb35e5c1d1aeac04e6a13a0a9b1240ffd7d09c8a69992e95712c8f9478d926386ae2a7577dae935f9b06f62fd3b",
        ),
        (
            4,
            "console sessions",
            "f1d267869402d4ff7b1bfe5ccfdd1532b6dd8746cd21d06e42fbae6d7abe61e1a9be994380a2865298aa7411c573cc13",
        ),
        (
            5,
            "streamed shards",
            "cd3612822d0c8aee746432d7370b385c63d926de5cdc2c379444b0fbc3903e686e9a8a845862a6eacc751501a268edb9",
        ),
        (
            6,
            "combined verifications",
            "bcecf8574378793cc3f7a31cff189724b7411b440df8aa29866c3ae9293fc709722e73122a1037a920891868c82a9eb4",
        ),
    ];
    const GOLDEN_POSTGRES: &[(i64, &str, &str)] = &[
        (
            1,
            "initial",
            "66a793c4e82226fcaca9690fac7c7c1abb124736d4beb616b6cf4a94b373f148b012017f178294ac20dee4503dfa9a7d",
        ),
        (
            2,
            "grant endpoints",
            "90334235d1528cda1ff9c22aa7f227032383e1c9a0ef4b802f969c59901d4b200c7e3aef78dcdb9ee0e69fba6f7b6532",
        ),
        (
            3,
            "trigger sets",
            "93a15bb35e5c1d1aeac04e6a13a0a9b1240ffd7d09c8a69992e95712c8f9478d926386ae2a7577dae935f9b06f62fd3b",
        ),
        (
            4,
            "console sessions",
            "f1d267869402d4ff7b1bfe5ccfdd1532b6dd8746cd21d06e42fbae6d7abe61e1a9be994380a2865298aa7411c573cc13",
        ),
        (
            5,
            "streamed shards",
            "cd3612822d0c8aee746432d7370b385c63d926de5cdc2c379444b0fbc3903e686e9a8a845862a6eacc751501a268edb9",
        ),
        (
            6,
            "combined verifications",
            "bcecf8574378793cc3f7a31cff189724b7411b440df8aa29866c3ae9293fc709722e73122a1037a920891868c82a9eb4",
        ),
    ];
}
