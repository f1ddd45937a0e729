"""Code shared by the FieldSync services and clients: values, errors, auth.

The generated wire stubs live in `fieldsync.v1`; the services in
`sync_service` and `audit_service`.
"""
