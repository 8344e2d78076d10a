// Certificates for a Concord federation, with OpenSSL's libcrypto (no hand-written crypto):
// a project's root CA, server and site certificates, the revocation list, kit signatures, and
// the server's check of a site's certificate.
#pragma once

#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

namespace concord::net {

enum class KeyType { EcdsaP256, Rsa2048 };
KeyType key_type_from_name(const std::string& name);  // "ecdsa-p256" | "rsa-2048"

// A certificate and its private key, both PEM text.
struct CertKey {
  std::string cert, key;
};

enum class CertRole { CA, Server, Site };

struct CertSpec {
  std::string common_name;
  CertRole role = CertRole::Site;
  std::vector<std::string> hosts;  // server: subjectAltName entries (DNS names or IP addresses)
  uint64_t serial = 1;
  std::time_t not_before = 0;  // 0: now - 1 hour (clock skew between machines)
  std::time_t not_after = 0;   // 0: not_before + validity_days
  int validity_days = 365;
  KeyType key = KeyType::EcdsaP256;
};

// A self-signed root CA (role CA).
CertKey make_ca(const CertSpec& spec);
// A server (TLS server auth, SANs = hosts) or site (TLS client auth) certificate signed by `ca`.
CertKey issue_certificate(const CertKey& ca, const CertSpec& spec);
// A revocation list signed by `ca` listing `serials`, valid until `next_update`.
std::string make_crl(const CertKey& ca, const std::vector<uint64_t>& serials,
                     std::time_t next_update);

struct CertInfo {
  std::string common_name;
  uint64_t serial = 0;
  std::time_t not_before = 0, not_after = 0;
  std::string sha256;  // fingerprint of the DER certificate, hex
};
CertInfo certificate_info(const std::string& pem);

// SHA-256 of bytes, lowercase hex.
std::string sha256_hex(const std::string& bytes);
// A signature over `data` by the PEM private key, and its check against a PEM certificate's key.
std::string sign_bytes(const std::string& key_pem, const std::string& data);
bool verify_bytes(const std::string& cert_pem, const std::string& data,
                  const std::string& signature);
// True when the PEM private key belongs to the PEM certificate.
bool key_matches_certificate(const std::string& key_pem, const std::string& cert_pem);

// The server's check of a site's certificate: signed by the CA, within its dates, usable for
// TLS client authentication, not revoked (when a CRL file is given; re-read when it changes).
class ClientCertificateCheck {
 public:
  ClientCertificateCheck(const std::string& ca_file, const std::string& crl_file);
  // The certificate's common name, or throws concord::Error saying why it is refused
  // ("was revoked", "expired on ...", "is not signed by this project's CA", ...).
  std::string verify(const std::string& cert_pem);

 private:
  std::string ca_pem_, crl_file_, crl_pem_;
  std::time_t crl_mtime_ = 0;
  long crl_mtime_ns_ = 0;
};

}  // namespace concord::net
