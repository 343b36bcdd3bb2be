"""Messages shared by the enclave, the client and the provider's server: pure code, no I/O.

* :mod:`.signed`   signed JSON envelopes (licenses, vouchers)
* :mod:`.setup`    the setup phase: report_data binding, HPKE provisioning payload
* :mod:`.license`  the license the provider signs for one device
* :mod:`.voucher`  offline top-ups
* :mod:`.receipts` the hash-chained usage log the enclave signs
"""
