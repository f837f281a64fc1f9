-- Run once by the postgres image on an empty data volume
-- (/docker-entrypoint-initdb.d). The services create their own tables.
CREATE DATABASE bank_core;
CREATE DATABASE bank_channel;
