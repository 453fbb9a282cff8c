//! The embedded source: a directory of YAML manifests, watched for changes.
