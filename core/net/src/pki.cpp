#include <concord/error.h>
#include <concord/message.h>
#include <concord/net/pki.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <sys/stat.h>

#include <cstdio>
#include <memory>

namespace concord::net {

namespace {

template <class T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using PKey = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using Crl = std::unique_ptr<X509_CRL, Deleter<X509_CRL, X509_CRL_free>>;
using Bio = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using Store = std::unique_ptr<X509_STORE, Deleter<X509_STORE, X509_STORE_free>>;
using StoreCtx = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX, X509_STORE_CTX_free>>;
using MdCtx = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX, EVP_MD_CTX_free>>;

// The reason of OpenSSL's last error, with `what` in front.
[[noreturn]] void fail(const std::string& what) {
  unsigned long e = ERR_get_error();
  char buf[256] = "unknown error";
  if (e) ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  throw Error(what + ": " + buf);
}
void ok(int r, const std::string& what) {
  if (r <= 0) fail(what);
}

Bio mem_bio(const std::string& s) {
  Bio b(BIO_new_mem_buf(s.data(), int(s.size())));
  if (!b) fail("BIO_new_mem_buf");
  return b;
}
std::string bio_text(BIO* b) {
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  return std::string(p, size_t(n));
}

Cert read_cert(const std::string& pem) {
  Bio b = mem_bio(pem);
  Cert c(PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr));
  if (!c) fail("not a PEM certificate");
  return c;
}
PKey read_key(const std::string& pem) {
  Bio b = mem_bio(pem);
  PKey k(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
  if (!k) fail("not a PEM private key");
  return k;
}
std::string cert_pem(X509* c) {
  Bio b(BIO_new(BIO_s_mem()));
  ok(PEM_write_bio_X509(b.get(), c), "PEM_write_bio_X509");
  return bio_text(b.get());
}
std::string key_pem(EVP_PKEY* k) {
  Bio b(BIO_new(BIO_s_mem()));
  ok(PEM_write_bio_PrivateKey(b.get(), k, nullptr, nullptr, 0, nullptr, nullptr),
     "PEM_write_bio_PrivateKey");
  return bio_text(b.get());
}

PKey new_key(KeyType type) {
  PKey k(type == KeyType::EcdsaP256 ? EVP_EC_gen("P-256") : EVP_RSA_gen(2048));
  if (!k) fail("key generation");
  return k;
}

void add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (!ext) fail("certificate extension " + std::string(OBJ_nid2sn(nid)) + "=" + value);
  int r = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  ok(r, "X509_add_ext");
}

bool is_ip(const std::string& h) {
  if (h.find(':') != std::string::npos) return true;  // IPv6
  return !h.empty() && h.find_first_not_of("0123456789.") == std::string::npos;
}

std::string text_of(const ASN1_TIME* t) {
  Bio b(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(b.get(), t);
  return bio_text(b.get());
}

std::time_t time_of(const ASN1_TIME* t) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return timegm(&tm);
}

CertKey make_cert(const CertSpec& spec, X509* issuer, EVP_PKEY* issuer_key) {
  if (spec.common_name.empty() || spec.common_name.size() > 64)
    throw Error("certificate name '" + spec.common_name + "': must be 1-64 characters");
  PKey key = new_key(spec.key);
  Cert c(X509_new());
  X509* x = c.get();
  ok(X509_set_version(x, 2), "X509_set_version");
  ok(ASN1_INTEGER_set_uint64(X509_get_serialNumber(x), spec.serial), "serial");
  const std::time_t now = std::time(nullptr);
  const std::time_t nb = spec.not_before ? spec.not_before : now - 3600;
  const std::time_t na =
      spec.not_after ? spec.not_after : nb + std::time_t(spec.validity_days) * 86400;
  if (!ASN1_TIME_set(X509_getm_notBefore(x), nb) || !ASN1_TIME_set(X509_getm_notAfter(x), na))
    fail("validity dates");
  X509_NAME* name = X509_get_subject_name(x);
  ok(X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                reinterpret_cast<const unsigned char*>(spec.common_name.c_str()),
                                -1, -1, 0),
     "subject name");
  ok(X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name), "issuer name");
  ok(X509_set_pubkey(x, key.get()), "X509_set_pubkey");
  X509* iss = issuer ? issuer : x;
  add_ext(x, iss, NID_subject_key_identifier, "hash");
  if (spec.role == CertRole::CA) {
    add_ext(x, iss, NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
    add_ext(x, iss, NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature");
  } else {
    add_ext(x, iss, NID_authority_key_identifier, "keyid:always");
    add_ext(x, iss, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(x, iss, NID_key_usage,
            spec.key == KeyType::EcdsaP256 ? "critical,digitalSignature"
                                           : "critical,digitalSignature,keyEncipherment");
    add_ext(x, iss, NID_ext_key_usage, spec.role == CertRole::Server ? "serverAuth" : "clientAuth");
    std::string san;
    for (const auto& h : spec.hosts)
      san += (san.empty() ? "" : ",") + std::string(is_ip(h) ? "IP:" : "DNS:") + h;
    if (spec.role == CertRole::Server && san.empty())
      throw Error("server certificate '" + spec.common_name + "': no host names");
    if (!san.empty()) add_ext(x, iss, NID_subject_alt_name, san);
  }
  ok(X509_sign(x, issuer_key ? issuer_key : key.get(), EVP_sha256()), "X509_sign");
  return {cert_pem(x), key_pem(key.get())};
}

std::string read_text_file(const std::string& file) {
  Bytes b = read_file(file, size_t(16) << 20);
  return std::string(reinterpret_cast<const char*>(b->data()), b->size());
}

}  // namespace

KeyType key_type_from_name(const std::string& name) {
  if (name == "ecdsa-p256") return KeyType::EcdsaP256;
  if (name == "rsa-2048") return KeyType::Rsa2048;
  throw Error("key type '" + name + "': expected ecdsa-p256 or rsa-2048");
}

CertKey make_ca(const CertSpec& spec) {
  CertSpec s = spec;
  s.role = CertRole::CA;
  return make_cert(s, nullptr, nullptr);
}

CertKey issue_certificate(const CertKey& ca, const CertSpec& spec) {
  if (spec.role == CertRole::CA) throw Error("issue_certificate: use make_ca for a CA");
  Cert c = read_cert(ca.cert);
  PKey k = read_key(ca.key);
  return make_cert(spec, c.get(), k.get());
}

std::string make_crl(const CertKey& ca, const std::vector<uint64_t>& serials,
                     std::time_t next_update) {
  Cert c = read_cert(ca.cert);
  PKey k = read_key(ca.key);
  Crl crl(X509_CRL_new());
  ok(X509_CRL_set_version(crl.get(), 1), "X509_CRL_set_version");
  ok(X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(c.get())), "CRL issuer");
  std::unique_ptr<ASN1_TIME, Deleter<ASN1_TIME, ASN1_TIME_free>> now(
      ASN1_TIME_set(nullptr, std::time(nullptr)));
  std::unique_ptr<ASN1_TIME, Deleter<ASN1_TIME, ASN1_TIME_free>> next(
      ASN1_TIME_set(nullptr, next_update));
  ok(X509_CRL_set1_lastUpdate(crl.get(), now.get()), "CRL lastUpdate");
  ok(X509_CRL_set1_nextUpdate(crl.get(), next.get()), "CRL nextUpdate");
  for (uint64_t serial : serials) {
    X509_REVOKED* r = X509_REVOKED_new();
    ASN1_INTEGER* s = ASN1_INTEGER_new();
    ASN1_INTEGER_set_uint64(s, serial);
    X509_REVOKED_set_serialNumber(r, s);
    ASN1_INTEGER_free(s);
    X509_REVOKED_set_revocationDate(r, now.get());
    ok(X509_CRL_add0_revoked(crl.get(), r), "X509_CRL_add0_revoked");
  }
  X509_CRL_sort(crl.get());
  ok(X509_CRL_sign(crl.get(), k.get(), EVP_sha256()), "X509_CRL_sign");
  Bio b(BIO_new(BIO_s_mem()));
  ok(PEM_write_bio_X509_CRL(b.get(), crl.get()), "PEM_write_bio_X509_CRL");
  return bio_text(b.get());
}

CertInfo certificate_info(const std::string& pem) {
  Cert c = read_cert(pem);
  CertInfo info;
  char cn[256] = "";
  X509_NAME_get_text_by_NID(X509_get_subject_name(c.get()), NID_commonName, cn, sizeof cn);
  info.common_name = cn;
  ASN1_INTEGER_get_uint64(&info.serial, X509_get0_serialNumber(c.get()));
  info.not_before = time_of(X509_get0_notBefore(c.get()));
  info.not_after = time_of(X509_get0_notAfter(c.get()));
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  ok(X509_digest(c.get(), EVP_sha256(), md, &n), "X509_digest");
  static const char* hex = "0123456789abcdef";
  for (unsigned i = 0; i < n; ++i) (info.sha256 += hex[md[i] >> 4]) += hex[md[i] & 15];
  return info;
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  ok(EVP_Digest(bytes.data(), bytes.size(), md, &n, EVP_sha256(), nullptr), "EVP_Digest");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < n; ++i) (out += hex[md[i] >> 4]) += hex[md[i] & 15];
  return out;
}

std::string sign_bytes(const std::string& key_pem_text, const std::string& data) {
  PKey k = read_key(key_pem_text);
  MdCtx ctx(EVP_MD_CTX_new());
  ok(EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, k.get()), "EVP_DigestSignInit");
  size_t n = 0;
  ok(EVP_DigestSign(ctx.get(), nullptr, &n, reinterpret_cast<const unsigned char*>(data.data()),
                    data.size()),
     "EVP_DigestSign");
  std::string sig(n, '\0');
  ok(EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &n,
                    reinterpret_cast<const unsigned char*>(data.data()), data.size()),
     "EVP_DigestSign");
  sig.resize(n);
  return sig;
}

bool verify_bytes(const std::string& cert_pem_text, const std::string& data,
                  const std::string& signature) {
  Cert c = read_cert(cert_pem_text);
  EVP_PKEY* pub = X509_get0_pubkey(c.get());
  if (!pub) fail("certificate without a public key");
  MdCtx ctx(EVP_MD_CTX_new());
  ok(EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, pub), "EVP_DigestVerifyInit");
  int r = EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                           signature.size(), reinterpret_cast<const unsigned char*>(data.data()),
                           data.size());
  ERR_clear_error();
  return r == 1;
}

bool key_matches_certificate(const std::string& key_pem_text, const std::string& cert_pem_text) {
  Cert c = read_cert(cert_pem_text);
  PKey k = read_key(key_pem_text);
  int r = X509_check_private_key(c.get(), k.get());
  ERR_clear_error();
  return r == 1;
}

ClientCertificateCheck::ClientCertificateCheck(const std::string& ca_file,
                                               const std::string& crl_file)
    : ca_pem_(read_text_file(ca_file)), crl_file_(crl_file) {
  read_cert(ca_pem_);  // a clear error now rather than at the first site
}

std::string ClientCertificateCheck::verify(const std::string& pem) {
  if (pem.empty()) throw Error("presented no client certificate");
  Cert ca = read_cert(ca_pem_);
  Cert leaf;
  try {
    leaf = read_cert(pem);
  } catch (const Error& e) {
    throw Error(std::string("client certificate unreadable: ") + e.what());
  }
  char cn[256] = "";
  X509_NAME_get_text_by_NID(X509_get_subject_name(leaf.get()), NID_commonName, cn, sizeof cn);
  uint64_t serial = 0;
  ASN1_INTEGER_get_uint64(&serial, X509_get0_serialNumber(leaf.get()));
  const std::string who =
      std::string("certificate '") + cn + "' (serial " + std::to_string(serial) + ")";

  Store store(X509_STORE_new());
  ok(X509_STORE_add_cert(store.get(), ca.get()), "X509_STORE_add_cert");
  if (!crl_file_.empty()) {
    struct stat st {};
    if (stat(crl_file_.c_str(), &st) != 0)
      throw Error("revocation list " + crl_file_ + " is missing: refusing every site");
    if (st.st_mtim.tv_sec != crl_mtime_ || st.st_mtim.tv_nsec != crl_mtime_ns_ ||
        crl_pem_.empty()) {
      crl_pem_ = read_text_file(crl_file_);
      crl_mtime_ = st.st_mtim.tv_sec;
      crl_mtime_ns_ = st.st_mtim.tv_nsec;
    }
    Bio b = mem_bio(crl_pem_);
    Crl crl(PEM_read_bio_X509_CRL(b.get(), nullptr, nullptr, nullptr));
    if (!crl) fail("revocation list " + crl_file_);
    ok(X509_STORE_add_crl(store.get(), crl.get()), "X509_STORE_add_crl");
    X509_STORE_set_flags(store.get(), X509_V_FLAG_CRL_CHECK);
  }
  StoreCtx ctx(X509_STORE_CTX_new());
  ok(X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), nullptr), "X509_STORE_CTX_init");
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  if (X509_verify_cert(ctx.get()) == 1) {
    ERR_clear_error();
    if (!*cn) throw Error(who + " has no common name");
    return cn;
  }
  ERR_clear_error();
  const int err = X509_STORE_CTX_get_error(ctx.get());
  switch (err) {
    case X509_V_ERR_CERT_REVOKED:
      throw Error(who + " was revoked (" + crl_file_ + ")");
    case X509_V_ERR_CERT_HAS_EXPIRED:
      throw Error(who + " expired on " + text_of(X509_get0_notAfter(leaf.get())));
    case X509_V_ERR_CERT_NOT_YET_VALID:
      throw Error(who + " is not valid before " + text_of(X509_get0_notBefore(leaf.get())));
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
      throw Error(who + " is not signed by this project's CA");
    case X509_V_ERR_CRL_HAS_EXPIRED:
      throw Error("revocation list " + crl_file_ +
                  " has expired: renew it (concord provision revoke) before sites can connect");
    case X509_V_ERR_INVALID_PURPOSE:
      throw Error(who + " is not a site certificate (no TLS client use)");
    default:
      throw Error(who + " refused: " + X509_verify_cert_error_string(err));
  }
}

}  // namespace concord::net
