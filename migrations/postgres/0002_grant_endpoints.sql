-- The model endpoints (origins, as a JSON array) the publisher approved for a grant; NULL allows
-- any endpoint the server's address rules allow.
ALTER TABLE grants ADD COLUMN endpoints TEXT;
